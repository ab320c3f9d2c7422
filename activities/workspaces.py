"""Activities for workspaces: thin, idempotent adapters over storage and the database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from controllers.errors import BackendError
from controllers.registry import Controllers
from core.status import WorkspaceStatus
from db import workspaces
from workflows.models import Removal, ScanResult, WorkspaceErrorInput, WorkspaceRef
from workflows.steps import WorkspaceSteps


class WorkspaceActivities(WorkspaceSteps):
    """A workspace's removal (its directory, then its row), the error status of one that
    could not be removed, and a workspace's rescan."""

    def __init__(self, controllers: Controllers) -> None:
        self._controllers = controllers

    @activity.defn
    async def delete_workspace_directory(self, ref: WorkspaceRef) -> Removal:
        """Remove the directory; a storage that refuses (a path outside its root) fails
        for good, never retried."""
        row = await workspaces.location(ref.workspace_id)
        if row is None:
            return Removal(removed=False)  # already gone: a retry after the row was removed
        if row["file_path"]:
            storage = self._controllers.storage_for(row["storage_name"])
            try:
                async with heartbeating():
                    await storage.delete_workspace(row["file_path"])
            except BackendError as err:
                # The storage refused (a path outside its root, say): retrying cannot help.
                raise ApplicationError(err.log_message, type="StorageRefused",
                                       non_retryable=True) from err
        return Removal(removed=True)

    @activity.defn
    async def delete_workspace_row(self, ref: WorkspaceRef) -> Removal:
        return Removal(removed=await workspaces.delete_deleting(ref.workspace_id))

    @activity.defn
    async def mark_workspace_error(self, inp: WorkspaceErrorInput) -> None:
        await workspaces.set_status(inp.workspace_id, WorkspaceStatus.error, inp.reason)

    @activity.defn
    async def scan_workspace(self, ref: WorkspaceRef) -> ScanResult:
        row = await workspaces.location(ref.workspace_id)
        if row is None or row["status"] == WorkspaceStatus.deleting or not row["file_path"]:
            return ScanResult(workspace_id=ref.workspace_id, found=False)
        started = await workspaces.db_clock()  # writes finished before this are in the scan
        async with heartbeating():
            scan = await self._controllers.storage_for(row["storage_name"]).scan(row["file_path"])
        found = await workspaces.store_scan(ref.workspace_id, scan, started)
        return ScanResult(
            workspace_id=ref.workspace_id, found=found, disk_space=scan.disk_space,
            files=len(scan.files), symlinks=len(scan.symlinks),
        )

    def all(self) -> list[Callable[..., Any]]:
        return [self.delete_workspace_directory, self.delete_workspace_row,
                self.mark_workspace_error, self.scan_workspace]
