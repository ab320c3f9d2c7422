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

from workflows import models


def _contract() -> NotImplementedError:
    return NotImplementedError("a contract: the worker runs its implementation")


class JobSteps:
    """``JobWorkflow``'s activities (``activities.jobs.JobActivities``)."""

    @activity.defn
    async def prepare_job(self, inp: models.JobInput) -> models.PrepareResult:
        """The job's directory and script (histories from before ``start_job``)."""
        raise _contract()

    @activity.defn
    async def launch_job(self, inp: models.LaunchInput) -> models.JobHandle:
        """Launch, or find the job an earlier attempt launched (a retry never launches
        twice); a step of its own before ``start_job``."""
        raise _contract()

    @activity.defn
    async def start_job(self, inp: models.StartJobInput) -> models.StartJobResult:
        """Prepare, launch, look once and write the first status: the whole start in one
        local activity, each part idempotent."""
        raise _contract()

    @activity.defn
    async def abandon_launch(self, inp: models.AbandonInput) -> models.AbandonResult | None:
        """End whatever a launch given up started."""
        raise _contract()

    @activity.defn
    async def watch_job(self, inp: models.WatchInput) -> models.WatchResult:
        """The job's state once it differs from the known one, or at the timeout."""
        raise _contract()

    @activity.defn
    async def stop_job(self, inp: models.StopJobInput) -> None:
        """End the job on its resource (nothing to tell: ``watch_job`` looks after)."""
        raise _contract()

    @activity.defn
    async def job_connection(self, inp: models.ConnectionInput) -> models.ConnectionResult:
        """Whether the session answers yet (its secrets go to the job row, not here)."""
        raise _contract()

    @activity.defn
    async def record_job_status(
            self, update: models.JobStatusUpdate) -> models.JobStatusUpdate | bool:
        """Write a status change (and publish it); what was written comes back."""
        raise _contract()

    @activity.defn
    async def session_idle_seconds(self, inp: models.IdleCheck) -> models.IdleResult | float:
        """How long the session has gone unused (through the passthrough), to stop one
        left idle past its job type's ``idle_timeout_minutes``."""
        raise _contract()

    @activity.defn
    async def finalize_job(self, inp: models.FinalizeInput) -> models.FinalizeInput | None:
        """End the job's row: status, end time, core-hours, quota, workspace."""
        raise _contract()


class WorkspaceSteps:
    """Activities on workspaces (``activities.workspaces.WorkspaceActivities``)."""

    @activity.defn
    async def delete_workspace_directory(self, ref: models.WorkspaceRef) -> models.Removal | bool:
        """Remove the workspace's directory (a retry after its row went: nothing)."""
        raise _contract()

    @activity.defn
    async def delete_workspace_row(self, ref: models.WorkspaceRef) -> models.Removal | bool:
        """Remove the row of a workspace marked ``deleting``."""
        raise _contract()

    @activity.defn
    async def mark_workspace_error(self, inp: models.WorkspaceErrorInput) -> None:
        """A workspace that could not be removed: ``error``, with the reason,
        for an operator to look at."""
        raise _contract()

    @activity.defn
    async def scan_workspace(self, ref: models.WorkspaceRef) -> models.ScanResult:
        """Walk the workspace (confined to it) and store its size and files; a result
        older than the one stored is dropped."""
        raise _contract()


class ShareSteps:
    """Activities of a share (``activities.shares.ShareActivities``)."""

    @activity.defn
    async def copy_shared_workspace(self, ref: models.ShareRef) -> models.ShareCopyResult:
        """Copy the original into the share's copy, resuming after the last
        entry an earlier attempt reported (it heartbeats its progress)."""
        raise _contract()

    @activity.defn
    async def send_share_invitation(self, ref: models.ShareRef) -> models.InvitationResult | bool:
        """E-mail the recipient; a refused message is logged, never retried."""
        raise _contract()

    @activity.defn
    async def set_workspace_status(
            self, inp: models.WorkspaceStatusInput) -> models.StatusChange | bool:
        """Set the copy's status, only from the given ones (one statement)."""
        raise _contract()


class UpkeepSteps:
    """Activities of the scheduled upkeep (``activities.upkeep.UpkeepActivities``)."""

    @activity.defn
    async def rescan_all_workspaces(self, inp: models.UpkeepInput) -> models.RescanResult | int:
        """Rescan every workspace in use; one that cannot be scanned is
        skipped, not the rest."""
        raise _contract()

    @activity.defn
    async def recompute_usage(self, inp: models.UpkeepInput) -> models.UsageResult:
        """Every user's usage recounted from their workspaces and jobs."""
        raise _contract()

    @activity.defn
    async def reconcile_jobs(self, inp: models.UpkeepInput) -> models.ReconcileResult:
        """Active jobs whose workflow is gone (or ended without them): failed, with
        why."""
        raise _contract()
