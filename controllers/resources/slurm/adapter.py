"""What ``SlurmResource`` needs of slurmrestd, independent of the OpenAPI plugin version.

slurmrestd's JSON changes shape between plugin versions (v0.0.39 turns numbers into
``{"set", "infinite", "number"}`` objects and the environment into a list, later versions
make ``job_state`` a list). Each version gets one ``SlurmAdapter`` subclass that turns our
requests into its JSON and its JSON into ``SlurmJob``; the resource never reads raw JSON.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


class SlurmApiError(Exception):
    """slurmrestd answered with errors (in its ``errors`` array, whatever the HTTP status).

    ``numbers`` are Slurm's error numbers (2017 = invalid job id), so callers can tell a
    job Slurm has forgotten from a transient failure."""

    def __init__(self, status_code: int, errors: list[dict[str, Any]], text: str = "",
                 body: Any = None) -> None:
        self.status_code = status_code
        self.errors = errors
        self.body = body
        self.numbers = {int(n) for e in errors
                        if isinstance(n := e.get("error_number", e.get("error_code")), int)}
        summary = "; ".join(
            str(e.get("description") or e.get("error") or e) for e in errors) or text[:200]
        super().__init__(f"slurmrestd HTTP {status_code}: {summary}")


# Slurm's ESLURM_INVALID_JOB_ID: the controller does not know the job (never, or no longer).
INVALID_JOB_ID = 2017


@dataclass(frozen=True)
class SubmitSpec:
    """One batch job, as the resource wants it submitted."""

    name: str
    script: str
    workdir: str
    environment: dict[str, str]
    cpus: int = 1
    memory_mb: int | None = None
    time_limit_min: int | None = None
    partition: str | None = None
    gres: str | None = None
    comment: str = ""
    standard_output: str | None = None


@dataclass(frozen=True)
class SlurmJob:
    """The fields of a Slurm job record that the resource reads."""

    job_id: int
    name: str
    user_name: str
    state: str  # Slurm's base state: PENDING, RUNNING, COMPLETED, ...
    state_reason: str = ""
    cpus: int = 1
    submit_time: int = 0
    start_time: int = 0
    end_time: int = 0
    time_limit_min: int | None = None
    exit_code: int | None = None  # the raw wait status: ``exit 3`` gives 768
    batch_host: str = ""
    workdir: str = ""
    # How often Slurm requeued the job (after a node failure or a preemption).
    restart_count: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


class SlurmAdapter(ABC):
    """Paths, request bodies and response parsing of one slurmrestd OpenAPI version."""

    version: str

    @property
    def prefix(self) -> str:
        return f"/slurm/{self.version}"

    def ping_path(self) -> str:
        return f"{self.prefix}/ping"

    def submit_path(self) -> str:
        return f"{self.prefix}/job/submit"

    def job_path(self, job_id: int) -> str:
        return f"{self.prefix}/job/{job_id}"

    def jobs_path(self) -> str:
        return f"{self.prefix}/jobs"

    @abstractmethod
    def submit_body(self, spec: SubmitSpec) -> dict[str, Any]:
        """The JSON body of a submission."""

    @abstractmethod
    def submitted_job_id(self, body: dict[str, Any]) -> int:
        """The job id a successful submission answered."""

    @abstractmethod
    def parse_jobs(self, body: dict[str, Any]) -> list[SlurmJob]:
        """The jobs of a ``GET /job/{id}`` or ``GET /jobs`` answer."""

    @abstractmethod
    def time_limit_body(self, minutes: int) -> dict[str, Any]:
        """The body of a ``POST /job/{id}`` that sets the job's time limit."""

    @abstractmethod
    def ping_ok(self, body: dict[str, Any]) -> bool:
        """Whether a ping answer says the controller is up."""

    def errors(self, body: Any) -> list[dict[str, Any]]:
        """The ``errors`` array of an answer (present in every version so far)."""
        if not isinstance(body, dict):
            return []
        errs = body.get("errors") or []
        return [e if isinstance(e, dict) else {"error": str(e)} for e in errs]
