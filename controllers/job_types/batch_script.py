"""A batch job running a script the user sends in ``job_details.script``."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from controllers.base import JobContext, JobType, JobTypeSettings
from controllers.errors import InvalidRequest

DEFAULT_SHEBANG = "#!/bin/bash\n"


class BatchScriptJob(JobType):
    """Runs ``job_details.script`` (text, at most ``max_script_bytes``) in the job's
    directory as the workspace owner; without a ``#!`` line it runs under bash. Its exit
    code is the job's: 0 is ``complete``, anything else ``failed``."""

    class Settings(JobTypeSettings):
        max_script_bytes: int = Field(default=64 * 1024, ge=1)
        time_limit_min: int | None = None

    def _limit(self) -> int:
        sizes = [getattr(s, "max_script_bytes", 0) for s in self.settings_by_resource.values()]
        return max(sizes, default=0) or self.Settings().max_script_bytes

    def validate_job_details(self, job_details: Mapping[str, Any]) -> None:
        script = job_details.get("script")
        if not isinstance(script, str) or not script.strip():
            raise InvalidRequest("job_details.script must be a non-empty string.")
        if len(script.encode()) > self._limit():
            raise InvalidRequest(f"job_details.script is larger than {self._limit()} bytes.")
        if "\0" in script:
            raise InvalidRequest("job_details.script must not contain NUL characters.")

    def script(self, ctx: JobContext) -> str:
        script = ctx.job_details.get("script")
        try:
            self.validate_job_details(ctx.job_details)
        except InvalidRequest as err:
            # Checked at the request already; a job that still gets here fails visibly
            # rather than retrying its preparation forever.
            return f"{DEFAULT_SHEBANG}echo {shlex.quote(err.user_message)} >&2\nexit 2\n"
        assert isinstance(script, str)
        return script if script.startswith("#!") else DEFAULT_SHEBANG + script
