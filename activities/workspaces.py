"""Activities for workspaces: thin, idempotent adapters over storage and the database."""

from __future__ import annotations

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from controllers.errors import BackendError
from controllers.registry import Controllers
from db import queries
from workflows.models import ScanResult, WorkspaceErrorInput, WorkspaceRef


class WorkspaceActivities:
    def __init__(self, controllers: Controllers) -> None:
        self._controllers = controllers

    @activity.defn(name="delete_workspace_directory")
    async def delete_workspace_directory(self, ref: WorkspaceRef) -> bool:
        row = await queries.workspace_location(ref.workspace_id)
        if row is None:
            return False  # already gone: a retry after the row was removed
        if row["file_path"]:
            storage = self._controllers.storage_for(row["storage_name"])
            try:
                async with heartbeating():
                    await storage.delete_workspace(row["file_path"])
            except BackendError as err:
                # The storage refused (a path outside its root, say): retrying cannot help.
                raise ApplicationError(err.log_message, type="StorageRefused",
                                       non_retryable=True) from err
        return True

    @activity.defn(name="delete_workspace_row")
    async def delete_workspace_row(self, ref: WorkspaceRef) -> bool:
        return await queries.delete_workspace_row(ref.workspace_id)

    @activity.defn(name="mark_workspace_error")
    async def mark_workspace_error(self, inp: WorkspaceErrorInput) -> None:
        await queries.set_workspace_status(inp.workspace_id, "error", inp.reason)

    @activity.defn(name="scan_workspace")
    async def scan_workspace(self, ref: WorkspaceRef) -> ScanResult:
        row = await queries.workspace_location(ref.workspace_id)
        if row is None or row["status"] == "deleting" or not row["file_path"]:
            return ScanResult(workspace_id=ref.workspace_id, found=False)
        started = await queries.db_clock()  # writes finished before this are in the scan
        async with heartbeating():
            scan = await self._controllers.storage_for(row["storage_name"]).scan(row["file_path"])
        found = await queries.store_scan(ref.workspace_id, scan, started)
        return ScanResult(
            workspace_id=ref.workspace_id, found=found, disk_space=scan.disk_space,
            files=len(scan.files), symlinks=len(scan.symlinks),
        )

    def all(self) -> list:
        return [self.delete_workspace_directory, self.delete_workspace_row,
                self.mark_workspace_error, self.scan_workspace]
