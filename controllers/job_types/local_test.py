"""A batch job for trying a resource out: leaves a trace in its workdir, sleeps, succeeds."""

from __future__ import annotations

import shlex
from typing import cast

from pydantic import Field

from controllers.base import JobContext, JobType, JobTypeSettings

OUTPUT_FILE = "test_job_output.txt"
MAX_DURATION_SECONDS = 24 * 3600.0


class LocalTestJob(JobType):
    """Writes ``test_job_output.txt`` naming the job, sleeps ``duration_seconds``, exits 0."""

    class Settings(JobTypeSettings):
        duration_seconds: float = Field(default=10.0, ge=0)
        time_limit_min: int | None = None

    def script(self, ctx: JobContext) -> str:
        settings = cast(LocalTestJob.Settings, self.settings_for(ctx.resource_name))
        # A request may ask for another duration (how tests hold a job running).
        requested = ctx.job_details.get("duration_seconds")
        seconds = settings.duration_seconds
        if isinstance(requested, int | float) and not isinstance(requested, bool):
            seconds = min(max(float(requested), 0.0), MAX_DURATION_SECONDS)
        # Fixed-point notation: sleep does not read exponents such as 1e-05.
        duration = format(seconds, "f")
        return f"""#!/bin/bash
set -eu
cd {shlex.quote(ctx.workdir)}
echo "uws test job {ctx.job_id} started" >> {OUTPUT_FILE}
sleep {duration}
exit 0
"""
