"""Small query helpers shared by the API and the activities.

Writers that run in the background touch only the columns they own, in one statement.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from controllers.base import WorkspaceScan
from db.tables import Workspace


def now() -> datetime:
    return datetime.now(UTC)


def as_json(value: Any) -> Any:
    """Piccolo returns JSONB columns as text unless told otherwise; accept both."""
    if isinstance(value, str):
        return json.loads(value) if value else {}
    return value if value is not None else {}


async def workspace_location(workspace_id: int) -> dict[str, Any] | None:
    return await Workspace.select(
        Workspace.file_path, Workspace.storage_name, Workspace.status
    ).where(Workspace.id == workspace_id).first()


async def delete_workspace_row(workspace_id: int) -> bool:
    deleted = await Workspace.delete().where(
        (Workspace.id == workspace_id) & (Workspace.status == "deleting")
    ).returning(Workspace.id)
    return bool(deleted)


async def set_workspace_status(workspace_id: int, status: str, reason: str = "") -> None:
    await Workspace.update(
        {Workspace.status: status, Workspace.status_reason: reason}
    ).where(Workspace.id == workspace_id)


def current_details(scan: WorkspaceScan) -> dict[str, Any]:
    return {
        "files": [{"name": name} for name in scan.files],
        "symlinks": [{"name": name} for name in scan.symlinks],
    }


async def store_scan(workspace_id: int, scan: WorkspaceScan) -> bool:
    """Write a scan's result; a workspace being deleted is left alone."""
    updated = await Workspace.update(
        {
            Workspace.disk_space: scan.disk_space,
            Workspace.current_workspace_details: current_details(scan),
        }
    ).where(
        (Workspace.id == workspace_id) & (Workspace.status != "deleting")
    ).returning(Workspace.id)
    return bool(updated)


async def set_workspace_status_if(workspace_id: int, status: str, reason: str,
                                  only_from: list[str]) -> bool:
    """Set a workspace's status, optionally only from the given ones (one statement)."""
    where = Workspace.id == workspace_id
    if only_from:
        where = where & Workspace.status.is_in(only_from)
    updated = await Workspace.update(
        {Workspace.status: status, Workspace.status_reason: reason}
    ).where(where).returning(Workspace.id)
    return bool(updated)
