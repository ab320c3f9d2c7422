"""Inputs and outputs of every workflow, activity, signal, update and query.

One dataclass each, so fields can be added later without breaking running workflows.
Dependency-free on purpose: the API, the workflows (inside the sandbox) and the
activities all import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

TASK_QUEUE_DEFAULT = "uws"


def delete_workflow_id(workspace_id: int) -> str:
    return f"workspace-delete-{workspace_id}"


def scan_workflow_id(workspace_id: int) -> str:
    return f"workspace-scan-{workspace_id}"


# --- workspace deletion ---------------------------------------------------------------


@dataclass
class DeleteWorkspaceInput:
    workspace_id: int


@dataclass
class DeleteWorkspaceResult:
    deleted: bool
    reason: str = ""


@dataclass
class WorkspaceRef:
    workspace_id: int


@dataclass
class Removal:
    removed: bool  # False: there was nothing (left) to remove


@dataclass
class WorkspaceErrorInput:
    workspace_id: int
    reason: str


# --- workspace rescan -----------------------------------------------------------------


@dataclass
class ScanWorkspaceInput:
    workspace_id: int
    # Scans per run before continuing as new (short histories); an input so tests can
    # cross the bound, defaulting to the old constant so earlier histories replay.
    max_scans: int = 100


@dataclass
class ScanResult:
    workspace_id: int
    found: bool
    disk_space: int = 0
    files: int = 0
    symlinks: int = 0


@dataclass
class ScanRequest:
    """Signal payload: scan again (sent with signal-with-start after each change)."""

    reason: str = ""


@dataclass
class ScanWorkflowResult:
    scans: int
    results: list[ScanResult] = field(default_factory=list)


# --- jobs -----------------------------------------------------------------------------


def job_workflow_id(job_id: int) -> str:
    return f"job-{job_id}"


@dataclass
class JobInput:
    """What a job's workflow starts with: its row's ids, its type and resource, what its
    user asked for, and its limits (as the API decided them at the start)."""

    job_id: int
    user_id: int
    workspace_id: int
    job_type: str
    resource_name: str
    time_limit_min: float  # minutes; fractions are for tests
    resource_options: dict[str, Any] = field(default_factory=dict)
    job_details: dict[str, Any] = field(default_factory=dict)
    reserved_core_hours: float = 0.0
    idle_timeout_min: float | None = None
    # Still pending this long (launching, or queued on the resource): the job fails.
    max_pending_min: float | None = None
    # Watch loops per run before continuing as new (lowered by tests).
    loops_before_continue: int = 200


@dataclass
class JobHandle:
    """How a resource finds a job it launched again (``ComputeResource.launch`` answers
    a mapping; this is it, typed, as the workflow keeps it and passes it back). The fields
    are those of the built-in resources; a resource of a site's own keeps its other keys in
    ``extra``. Every history's handle, a plain object when it was recorded, reads as one.
    """

    id: int = -1  # the resource's number for the job: a process id, a Slurm job id
    job_id: int = 0  # ours
    hostname: str = ""
    cpus: int = 1
    workdir: str = ""
    # The local resource: the process group and the supervisor, with their start ticks
    # (a pid alone may be reused), where its records are, when it started.
    pgid: int = 0
    job_ticks: int | None = None
    supervisor_pid: int = 0
    supervisor_ticks: int | None = None
    state_dir: str = ""
    started_at: float = 0.0
    # Slurm: whose job it is there, and when it was submitted.
    user: str = ""
    submitted_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, handle: Mapping[str, Any]) -> JobHandle:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in handle.items() if k in names}
        return cls(**known, extra={k: v for k, v in handle.items() if k not in names})

    def as_mapping(self) -> dict[str, Any]:
        """The handle for its resource: every field (those it did not set at their
        defaults) and its own keys."""
        mapping = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**mapping, **self.extra}


@dataclass
class JobRunState:
    """Everything the workflow knows; carried across continue-as-new."""

    phase: str = "new"  # new | launched | ended
    handle: JobHandle | None = None
    hostname: str = ""
    deadline_epoch: float = 0.0  # time limit, as workflow time
    stop_requested: bool = False
    stop_reason: str = ""
    connection_known: bool = False
    unknown_streak: int = 0
    extended_minutes: int = 0
    # Why the job failed without reaching (or leaving) the resource's queue, if it did.
    fail_reason: str = ""
    pending_since: float = 0.0  # workflow time of the first run
    # Why the resource keeps the job queued, as last shown (Slurm's Resources, say).
    pending_reason: str = ""
    # What a launch given up had used (it ran until ended by ``abandon_launch``).
    abandoned_core_hours: float = 0.0


@dataclass
class JobContinuation:
    inp: JobInput
    state: JobRunState


@dataclass
class PrepareResult:
    workdir: str
    script: str
    interactive: bool
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class AbandonInput:
    """A launch given up with its outcome unknown: end whatever it may have started."""

    job_id: int
    resource_name: str
    workdir: str  # "": the job's directory in its workspace (a start in one step)
    user_id: int
    workspace_id: int = 0


@dataclass
class AbandonResult:
    core_hours: float = 0.0  # of what it ended: 0.0 when nothing had started


@dataclass
class LaunchInput:
    job_id: int
    resource_name: str
    workdir: str
    script: str
    resource_options: dict[str, Any]
    env: dict[str, str]
    time_limit_min: float
    user_id: int


@dataclass
class WatchInput:
    resource_name: str
    handle: JobHandle
    timeout_seconds: float
    known_status: str = ""
    # Our deadline (epoch seconds), so a resource with a limit of its own can keep up
    # with extensions; 0 in watches recorded before it existed.
    deadline_epoch: float = 0.0
    # Also return when a pending job's reason differs from this one (None: never).
    known_detail: str | None = None


@dataclass
class WatchResult:
    status: str  # pending | running | complete | failed | unknown
    detail: str = ""
    exit_code: int | None = None
    core_hours: float | None = None
    hostname: str | None = None


@dataclass
class StopJobInput:
    resource_name: str
    handle: JobHandle
    grace_seconds: float = 10.0


@dataclass
class ConnectionInput:
    job_id: int
    job_type: str
    resource_name: str
    workdir: str
    hostname: str
    job_details: dict[str, Any] = field(default_factory=dict)
    user_id: int = 0  # whose account the session's endpoint belongs to


@dataclass
class ConnectionResult:
    """Only whether the session answers: its link and token go to the job row, never
    into the workflow's history."""

    ready: bool
    current_job_details: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobStatusUpdate:
    """One status change, written to the jobs table and published to subscribers."""

    job_id: int
    status: str
    resource_job_id: int | None = None
    set_start: bool = False
    set_end: bool = False
    core_hours: float | None = None
    current_job_details: dict[str, Any] | None = None
    event: str = ""


@dataclass
class StartJobInput:
    """``start_job``: prepare, launch, look once and write the first status."""

    job: JobInput

    @property
    def job_id(self) -> int:
        return self.job.job_id


@dataclass
class StartJobResult:
    """Where the job runs and how to reach it again, and the first status written (for
    the timeline: a local activity's marker keeps its result, not its input)."""

    workdir: str
    interactive: bool
    handle: JobHandle
    hostname: str
    written: JobStatusUpdate


@dataclass
class IdleCheck:
    job_id: int


@dataclass
class IdleResult:
    seconds: float  # since the session was last used (or started)


@dataclass
class FinalizeInput:
    job_id: int
    workspace_id: int
    user_id: int
    status: str
    core_hours: float
    detail: str = ""


@dataclass
class StopRequest:
    reason: str = "Stopped by user."


@dataclass
class ExtendRequest:
    minutes: int
    max_total_minutes: int


@dataclass
class ExtendResult:
    time_limit_min: float
    deadline_epoch: float


@dataclass
class JobSnapshot:
    phase: str
    status: str
    deadline_epoch: float
    stop_requested: bool


# --- sharing --------------------------------------------------------------------------


def share_workflow_id(shared_workspace_id: int) -> str:
    return f"share-{shared_workspace_id}"


@dataclass
class ShareInput:
    """A share's copy (its row made by the API) and where it comes from."""

    shared_workspace_id: int
    original_workspace_id: int
    expiry_seconds: float


@dataclass
class ShareCopyResult:
    files: int
    bytes: int


@dataclass
class WorkspaceStatusInput:
    workspace_id: int
    status: str
    reason: str = ""
    only_from: list[str] = field(default_factory=list)  # empty: from any status


@dataclass
class ShareRef:
    shared_workspace_id: int


@dataclass
class InvitationResult:
    sent: bool  # False: no address, mail off, or the message was refused for good


@dataclass
class StatusChange:
    changed: bool  # False: the workspace was not in one of the statuses it could leave


# --- upkeep ---------------------------------------------------------------------------


@dataclass
class UpkeepInput:
    pass


@dataclass
class UsageResult:
    users: int


@dataclass
class RescanResult:
    workspaces: int  # scanned


@dataclass
class ReconcileResult:
    checked: int
    marked_failed: list[int] = field(default_factory=list)
