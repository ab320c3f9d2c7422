"""The activities workflows call, as contracts: each one's name, its input and its result.

Workflows call them by method (``workflow.execute_activity_method(JobSteps.watch_job,
...)``), so a call is type-checked and its result decoded by the method's annotation;
``activities/`` implements each class here (``class JobActivities(JobSteps)``), and a
worker runs those. A method's name is its activity's name, recorded in every history:
renaming one breaks every workflow that called it. Pure on purpose (Temporal's sandbox
loads this module for every workflow run): no implementation lives here.

A few results were plain values before they were dataclasses (a bool, a number, nothing);
their annotations name both, so the histories that recorded the plain value still replay.
"""

from __future__ import annotations

from temporalio import activity

from workflows.models import (
    AbandonInput,
    AbandonResult,
    ConnectionInput,
    ConnectionResult,
    FinalizeInput,
    IdleCheck,
    IdleResult,
    InvitationResult,
    JobHandle,
    JobInput,
    JobStatusUpdate,
    LaunchInput,
    PrepareResult,
    ReconcileResult,
    Removal,
    RescanResult,
    ScanResult,
    ShareCopyResult,
    ShareRef,
    StartJobInput,
    StartJobResult,
    StatusChange,
    StopJobInput,
    UpkeepInput,
    UsageResult,
    WatchInput,
    WatchResult,
    WorkspaceErrorInput,
    WorkspaceRef,
    WorkspaceStatusInput,
)


def _contract() -> NotImplementedError:
    return NotImplementedError("a contract: the worker runs its implementation")


class JobSteps:
    """``JobWorkflow``'s activities (``activities.jobs.JobActivities``)."""

    @activity.defn
    async def prepare_job(self, inp: JobInput) -> PrepareResult:
        """The job's directory and script (histories from before ``start_job``)."""
        raise _contract()

    @activity.defn
    async def launch_job(self, inp: LaunchInput) -> JobHandle:
        """Launch, or find the job an earlier attempt launched (before ``start_job``)."""
        raise _contract()

    @activity.defn
    async def start_job(self, inp: StartJobInput) -> StartJobResult:
        """Prepare, launch, look once and write the first status."""
        raise _contract()

    @activity.defn
    async def abandon_launch(self, inp: AbandonInput) -> AbandonResult | None:
        """End whatever a launch given up started."""
        raise _contract()

    @activity.defn
    async def watch_job(self, inp: WatchInput) -> WatchResult:
        """The job's state once it differs from the known one, or at the timeout."""
        raise _contract()

    @activity.defn
    async def stop_job(self, inp: StopJobInput) -> None:
        """End the job on its resource (nothing to tell: ``watch_job`` looks after)."""
        raise _contract()

    @activity.defn
    async def job_connection(self, inp: ConnectionInput) -> ConnectionResult:
        """Whether the session answers yet (its secrets go to the job row, not here)."""
        raise _contract()

    @activity.defn
    async def record_job_status(self, update: JobStatusUpdate) -> JobStatusUpdate | bool:
        """Write a status change (and publish it); what was written comes back."""
        raise _contract()

    @activity.defn
    async def session_idle_seconds(self, inp: IdleCheck) -> IdleResult | float:
        """How long the session has gone unused."""
        raise _contract()

    @activity.defn
    async def finalize_job(self, inp: FinalizeInput) -> FinalizeInput | None:
        """End the job's row: status, end time, core-hours, quota, workspace."""
        raise _contract()


class WorkspaceSteps:
    """Activities on workspaces (``activities.workspaces.WorkspaceActivities``)."""

    @activity.defn
    async def delete_workspace_directory(self, ref: WorkspaceRef) -> Removal | bool:
        raise _contract()

    @activity.defn
    async def delete_workspace_row(self, ref: WorkspaceRef) -> Removal | bool:
        raise _contract()

    @activity.defn
    async def mark_workspace_error(self, inp: WorkspaceErrorInput) -> None:
        raise _contract()

    @activity.defn
    async def scan_workspace(self, ref: WorkspaceRef) -> ScanResult:
        raise _contract()


class ShareSteps:
    """Activities of a share (``activities.shares.ShareActivities``)."""

    @activity.defn
    async def copy_shared_workspace(self, ref: ShareRef) -> ShareCopyResult:
        raise _contract()

    @activity.defn
    async def send_share_invitation(self, ref: ShareRef) -> InvitationResult | bool:
        raise _contract()

    @activity.defn
    async def set_workspace_status(self, inp: WorkspaceStatusInput) -> StatusChange | bool:
        raise _contract()


class UpkeepSteps:
    """Activities of the scheduled upkeep (``activities.upkeep.UpkeepActivities``)."""

    @activity.defn
    async def rescan_all_workspaces(self, inp: UpkeepInput) -> RescanResult | int:
        raise _contract()

    @activity.defn
    async def recompute_usage(self, inp: UpkeepInput) -> UsageResult:
        raise _contract()

    @activity.defn
    async def reconcile_jobs(self, inp: UpkeepInput) -> ReconcileResult:
        raise _contract()
