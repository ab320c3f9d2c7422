"""Activities of the scheduled upkeep workflows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.heartbeat import heartbeating
from controllers.registry import Controllers
from core.status import JobStatus
from db import jobs as job_rows
from db import quotas, workspaces
from workflows.models import (
    ReconcileResult,
    RescanResult,
    UpkeepInput,
    UsageResult,
    job_workflow_id,
)
from workflows.steps import UpkeepSteps

# A job row younger than this may not have its workflow yet (the API inserts, then starts).
_GRACE = timedelta(minutes=2)


class UpkeepActivities(UpkeepSteps):
    def __init__(self, controllers: Controllers, client: Client) -> None:
        self._c = controllers
        self._client = client

    @activity.defn
    async def rescan_all_workspaces(self, inp: UpkeepInput) -> RescanResult:
        rows = await workspaces.scannable()
        scanned = 0
        async with heartbeating():
            for row in rows:
                # One workspace that cannot be scanned (a storage since removed from the
                # config, a path outside its root) must not keep every other one stale.
                try:
                    storage = self._c.storage_for(row["storage_name"])
                    started = await workspaces.db_clock()
                    scan = await storage.scan(row["file_path"])
                except Exception as exc:
                    activity.logger.warning("workspace %s not rescanned: %s", row["id"], exc)
                    continue
                await workspaces.store_scan(row["id"], scan, started)
                scanned += 1
        return RescanResult(workspaces=scanned)

    @activity.defn
    async def recompute_usage(self, inp: UpkeepInput) -> UsageResult:
        return UsageResult(users=await quotas.recompute_usage())

    @activity.defn
    async def reconcile_jobs(self, inp: UpkeepInput) -> ReconcileResult:
        job_ids = await job_rows.unfinished_since(_GRACE)
        failed: list[int] = []
        async with heartbeating():
            for job_id in job_ids:
                reason = await self._workflow_gone(job_id)
                if reason:
                    await job_rows.finalize(job_id, JobStatus.failed, 0.0, reason)
                    failed.append(job_id)
        return ReconcileResult(checked=len(job_ids), marked_failed=failed)

    async def _workflow_gone(self, job_id: int) -> str:
        """Why the job's workflow cannot finish it any more, or "" while it can."""
        try:
            description = await self._client.get_workflow_handle(
                job_workflow_id(job_id)).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return "Its workflow no longer exists; marked failed by reconciliation."
            raise
        status = description.status
        if status in (WorkflowExecutionStatus.RUNNING, WorkflowExecutionStatus.CONTINUED_AS_NEW):
            return ""
        name = status.name.lower() if status else "unknown"
        return f"Its workflow ended ({name}) without finishing it; marked failed by reconciliation."

    def all(self) -> list[Any]:
        return [self.rescan_all_workspaces, self.recompute_usage, self.reconcile_jobs]
