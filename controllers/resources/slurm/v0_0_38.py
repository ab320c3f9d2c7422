"""slurmrestd's ``openapi/v0.0.38`` plugin (Slurm 22.05, Debian 12's packages).

Numbers and times are plain integers (epoch seconds; ``time_limit`` in minutes, ``null``
for unlimited), ``environment`` is an object, ``job_state`` a single string.
"""

from __future__ import annotations

from typing import Any

from controllers.resources.slurm.adapter import SlurmAdapter, SlurmJob, SubmitSpec


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


class AdapterV0038(SlurmAdapter):
    version = "v0.0.38"

    def submit_body(self, spec: SubmitSpec) -> dict[str, Any]:
        job: dict[str, Any] = {
            "name": spec.name,
            "current_working_directory": spec.workdir,
            "environment": dict(spec.environment),
            "tasks": 1,
            "cpus_per_task": spec.cpus,
            "comment": spec.comment,
        }
        optional = {
            "partition": spec.partition,
            "memory_per_node": spec.memory_mb,
            "time_limit": spec.time_limit_min,
            "gres": spec.gres,
            "standard_output": spec.standard_output,
        }
        job.update({k: v for k, v in optional.items() if v is not None})
        return {"script": spec.script, "job": job}

    def time_limit_body(self, minutes: int) -> dict[str, Any]:
        # v0.0.38 takes the job's properties unwrapped here (a {"job": ...} wrapper is
        # answered with an "Unknown" error).
        return {"time_limit": minutes}

    def submitted_job_id(self, body: dict[str, Any]) -> int:
        job_id = body.get("job_id")
        if not isinstance(job_id, int):
            raise ValueError(f"submission answered no job_id: {body!r:.200}")
        return job_id

    def parse_jobs(self, body: dict[str, Any]) -> list[SlurmJob]:
        return [self._job(j) for j in body.get("jobs") or [] if isinstance(j, dict)]

    @staticmethod
    def _job(j: dict[str, Any]) -> SlurmJob:
        limit = j.get("time_limit")
        return SlurmJob(
            job_id=_int(j.get("job_id"), -1),
            name=str(j.get("name") or ""),
            user_name=str(j.get("user_name") or ""),
            state=str(j.get("job_state") or "UNKNOWN").upper(),
            state_reason=str(j.get("state_reason") or ""),
            cpus=max(_int(j.get("cpus"), 1), 1),
            submit_time=_int(j.get("submit_time")),
            start_time=_int(j.get("start_time")),
            end_time=_int(j.get("end_time")),
            time_limit_min=limit if isinstance(limit, int) else None,
            exit_code=j.get("exit_code") if isinstance(j.get("exit_code"), int) else None,
            batch_host=str(j.get("batch_host") or ""),
            workdir=str(j.get("current_working_directory") or ""),
            restart_count=_int(j.get("restart_cnt")),
            raw=j,
        )

    def ping_ok(self, body: dict[str, Any]) -> bool:
        pings = body.get("pings") or []
        return any(isinstance(p, dict) and p.get("ping") == "UP" for p in pings)
