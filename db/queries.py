"""Small query helpers shared by the API and the activities.

Writers that run in the background touch only the columns they own, in one statement.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from controllers.base import WorkspaceScan
from db import quotas
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


async def db_clock() -> datetime:
    """The database's clock: what scans are compared with (``db.quotas`` claims)."""
    rows = await Workspace.raw("SELECT clock_timestamp() AS t")
    return rows[0]["t"]


async def store_scan(workspace_id: int, scan: WorkspaceScan,
                     started: datetime | None = None) -> bool:
    """Write a scan's result; ``False`` when the workspace is gone or being deleted.

    With ``started`` (``db_clock()`` read before the walk), a result older than the one
    stored is dropped (the upkeep's scan and the workspace's own may overlap), and the disk
    claims of writes finished by then end in the same transaction: the scan counted them."""
    async with Workspace._meta.db.transaction() as tx:
        updated = await tx.connection.fetchval(
            "UPDATE uws_workspace SET disk_space = $2, current_workspace_details = $3::jsonb, "
            "disk_scanned = COALESCE($4::timestamptz, disk_scanned) WHERE id = $1 "
            "AND status <> 'deleting' AND ($4::timestamptz IS NULL OR disk_scanned IS NULL "
            "OR disk_scanned <= $4::timestamptz) RETURNING id",
            workspace_id, scan.disk_space, json.dumps(current_details(scan)), started)
        if updated is None:
            # Dropped as older, or the workspace is gone (``False`` only for the latter).
            return bool(await tx.connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM uws_workspace WHERE id = $1 "
                "AND status <> 'deleting')", workspace_id))
        if started is not None:
            await quotas.settle_after_scan(tx.connection, workspace_id, started)
    return True


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
