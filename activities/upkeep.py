"""Activities of the scheduled upkeep workflows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.heartbeat import heartbeating
from controllers.registry import Controllers
from db import jobs as job_rows
from db import reads
from db.queries import db_clock, store_scan
from db.quotas import stored_disk_sql
from workflows.models import ReconcileResult, UpkeepInput, UsageResult, job_workflow_id

# What each user's workspaces count for their quota (db.quotas: shares charged to sharers).
_CHARGED_DISK = stored_disk_sql('q."user"')
# A job row younger than this may not have its workflow yet (the API inserts, then starts).
_GRACE = timedelta(minutes=2)


class UpkeepActivities:
    def __init__(self, controllers: Controllers, client: Client) -> None:
        self._c = controllers
        self._client = client

    @activity.defn(name="rescan_all_workspaces")
    async def rescan_all_workspaces(self, _: UpkeepInput) -> int:
        rows = await reads.fetch(
            "SELECT id, file_path, storage_name FROM uws_workspace "
            "WHERE status IN ('idle', 'active') AND file_path <> '' ORDER BY id")
        scanned = 0
        async with heartbeating():
            for row in rows:
                # One workspace that cannot be scanned (a storage since removed from the
                # config, a path outside its root) must not keep every other one stale.
                try:
                    storage = self._c.storage_for(row["storage_name"])
                    started = await db_clock()
                    scan = await storage.scan(row["file_path"])
                except Exception as exc:
                    activity.logger.warning("workspace %s not rescanned: %s", row["id"], exc)
                    continue
                await store_scan(row["id"], scan, started)
                scanned += 1
        return scanned

    @activity.defn(name="recompute_usage")
    async def recompute_usage(self, _: UpkeepInput) -> UsageResult:
        updated = await reads.fetch(
            "UPDATE uws_user_quota q SET "
            f"used_disk_space = {_CHARGED_DISK}, "
            "used_core_hours = COALESCE((SELECT SUM(j.core_hours) FROM uws_job j "
            'WHERE j."user" = q."user" AND j.datetime_end IS NOT NULL), 0), '
            "reserved_core_hours = COALESCE((SELECT SUM((j.job_details->'metrics'->>"
            "'reserved_core_hours')::float8) FROM uws_job j "
            'WHERE j."user" = q."user" AND j.datetime_end IS NULL), 0) RETURNING q.id')
        return UsageResult(users=len(updated))

    @activity.defn(name="reconcile_jobs")
    async def reconcile_jobs(self, _: UpkeepInput) -> ReconcileResult:
        rows = await reads.fetch(
            "SELECT id FROM uws_job WHERE status IN ('pending', 'running', 'stopping') "
            "AND datetime_end IS NULL AND datetime_created < now() - $1::interval ORDER BY id",
            _GRACE)
        failed: list[int] = []
        async with heartbeating():
            for row in rows:
                reason = await self._workflow_gone(row["id"])
                if reason:
                    await job_rows.finalize(row["id"], "failed", 0.0, reason)
                    failed.append(row["id"])
        return ReconcileResult(checked=len(rows), marked_failed=failed)

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
