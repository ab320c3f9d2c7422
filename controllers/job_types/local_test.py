"""A batch job for trying a resource out: leaves a trace in its workdir, sleeps, succeeds."""

from __future__ import annotations

import shlex
from typing import cast

from pydantic import Field

from controllers.base import JobContext, JobType, PluginSettings

OUTPUT_FILE = "test_job_output.txt"


class LocalTestJob(JobType):
    """Writes ``test_job_output.txt`` naming the job, sleeps ``duration_seconds``, exits 0."""

    class Settings(PluginSettings):
        duration_seconds: float = Field(default=10.0, ge=0)
        time_limit_min: int | None = None

    def script(self, ctx: JobContext) -> str:
        settings = cast(LocalTestJob.Settings, self.settings_for(ctx.resource_name))
        # Fixed-point notation: sleep does not read exponents such as 1e-05.
        duration = format(settings.duration_seconds, "f")
        return f"""#!/bin/bash
set -eu
cd {shlex.quote(ctx.workdir)}
echo "uws test job {ctx.job_id}" > {OUTPUT_FILE}
sleep {duration}
exit 0
"""
