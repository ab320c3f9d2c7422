"""Workspace rows: what clients list and read, creation and edits, scans, and the state
changes that race each other (starting a job, deleting, sharing).

A race is decided in one transaction that first locks the workspace's row, then checks
with fresh statements (READ COMMITTED: each sees what committed before the lock was
granted) and acts. So of a start and a delete sent together exactly one wins, in any API
process, and the loser sees the winner's result: never a job in a workspace that is being
removed, never a deletion under a job that was just inserted. Background writers (a scan)
touch only the columns they own, in one statement: a rescan never undoes a rename.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from core.status import (
    ACTIVE_JOB_STATUSES,
    STARTABLE_WORKSPACE_STATUSES,
    JobStatus,
    WorkspaceStatus,
)
from core.values import WorkspaceScan
from db import jobs as job_rows
from db import quotas, sql

# Every column, in the table's order (what the API shows of a workspace).
COLUMNS = ('id, "user", name, description, file_path, storage_name, disk_space, '
           "datetime_created, datetime_last_modified, datetime_last_job_launch, "
           "request_workspace_details, current_workspace_details, status, status_reason, "
           "default_job_type, disk_scanned")
# The listing's columns, as ``w``.
LISTED = (
    "w.id, w.name, w.description, w.disk_space, w.datetime_created, w.datetime_last_modified, "
    "w.datetime_last_job_launch, w.request_workspace_details, w.current_workspace_details, "
    "w.status, w.default_job_type"
)
# Shared copies their recipient has not accepted are not listed.
_ACCEPTED = ("NOT EXISTS (SELECT 1 FROM uws_shared_workspace_mapping m "
             "WHERE m.shared_workspace = w.id AND NOT m.is_accepted)")
FILTERS = ("name", "description", "status")


# --- reads -------------------------------------------------------------------------------


async def listing(user_id: int, filters: dict[str, str],
                  workspace_id: int | None = None) -> list[Any]:
    """The user's listed workspaces (optionally one id), with exact-match filters."""
    clauses = ['w."user" = $1', _ACCEPTED]
    args: list[Any] = [user_id]
    if workspace_id is not None:
        args.append(workspace_id)
        clauses.append(f"w.id = ${len(args)}")
    for name in FILTERS:  # fixed names only: never a client's text in SQL
        if name in filters:
            args.append(filters[name])
            clauses.append(f"w.{name} = ${len(args)}")
    return await sql.fetch(
        f"SELECT {LISTED} FROM uws_workspace w WHERE {' AND '.join(clauses)} ORDER BY w.id",
        *args)


async def owned(user_id: int, workspace_id: int) -> dict[str, Any] | None:
    """The user's workspace row (unaccepted copies included)."""
    row = await sql.fetchrow(
        f'SELECT {COLUMNS} FROM uws_workspace WHERE id = $1 AND "user" = $2',
        workspace_id, user_id)
    return dict(row) if row else None


async def get(workspace_id: int) -> dict[str, Any] | None:
    row = await sql.fetchrow(f"SELECT {COLUMNS} FROM uws_workspace WHERE id = $1",
                             workspace_id)
    return dict(row) if row else None


async def is_unaccepted_copy(workspace_id: int) -> bool:
    return bool(await sql.fetchval(
        "SELECT EXISTS (SELECT 1 FROM uws_shared_workspace_mapping "
        "WHERE shared_workspace = $1 AND NOT is_accepted)", workspace_id))


async def location(workspace_id: int) -> dict[str, Any] | None:
    """Where the workspace lives (path and storage) and its status."""
    row = await sql.fetchrow(
        "SELECT file_path, storage_name, status FROM uws_workspace WHERE id = $1",
        workspace_id)
    return dict(row) if row else None


async def status_of(workspace_id: int) -> str | None:
    return await sql.fetch_str("SELECT status FROM uws_workspace WHERE id = $1", workspace_id)


async def scannable() -> list[Any]:
    """Every workspace a usage rescan walks: in use, with a directory."""
    return await sql.fetch(
        "SELECT id, file_path, storage_name FROM uws_workspace "
        "WHERE status = ANY($1) AND file_path <> '' ORDER BY id",
        [WorkspaceStatus.idle, WorkspaceStatus.active])


# --- creation and edits ------------------------------------------------------------------


async def create(user_id: int, name: str, description: str, storage_name: str,
                 default_job_type: str | None, request_details: dict[str, Any]) -> int:
    """A new workspace row (``initializing``, no directory yet); its id."""
    new_id = await sql.fetch_int(
        'INSERT INTO uws_workspace ("user", name, description, storage_name, default_job_type, '
        "request_workspace_details, current_workspace_details, status) "
        "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8) RETURNING id",
        user_id, name, description, storage_name, default_job_type,
        json.dumps(request_details), json.dumps({"files": [], "symlinks": []}),
        WorkspaceStatus.initializing)
    assert new_id is not None
    return new_id


async def set_path(workspace_id: int, path: str) -> None:
    """Where the workspace lives: set once, at creation."""
    await sql.execute("UPDATE uws_workspace SET file_path = $2 WHERE id = $1",
                      workspace_id, path)


async def remove(workspace_id: int) -> None:
    """Delete the row outright (a creation that failed; its claims go with it)."""
    await sql.execute("DELETE FROM uws_workspace WHERE id = $1", workspace_id)


# Columns a client may change (PUT /workspaces/{id}/), with the SQL cast of each value.
_EDITABLE = {"name": "", "description": "", "default_job_type": "",
             "request_workspace_details": "::jsonb"}


async def edit(workspace_id: int, changes: dict[str, Any]) -> None:
    """Change what the client asked for (``_EDITABLE``) and stamp the modification."""
    sets: list[str] = ["datetime_last_modified = now()"]
    args: list[Any] = [workspace_id]
    for column, value in changes.items():
        cast = _EDITABLE[column]  # KeyError: not a column a client may change
        args.append(json.dumps(value) if cast else value)
        sets.append(f"{column} = ${len(args)}{cast}")
    await sql.execute(f"UPDATE uws_workspace SET {', '.join(sets)} WHERE id = $1", *args)


async def set_status(workspace_id: int, status: WorkspaceStatus, reason: str = "") -> None:
    await sql.execute("UPDATE uws_workspace SET status = $2, status_reason = $3 WHERE id = $1",
                      workspace_id, status, reason)


async def set_status_if(workspace_id: int, status: WorkspaceStatus, reason: str,
                        only_from: list[str]) -> bool:
    """Set a workspace's status, optionally only from the given ones (one statement)."""
    if only_from:
        updated = await sql.fetchval(
            "UPDATE uws_workspace SET status = $2, status_reason = $3 "
            "WHERE id = $1 AND status = ANY($4) RETURNING id",
            workspace_id, status, reason, only_from)
    else:
        updated = await sql.fetchval(
            "UPDATE uws_workspace SET status = $2, status_reason = $3 WHERE id = $1 "
            "RETURNING id", workspace_id, status, reason)
    return updated is not None


async def delete_deleting(workspace_id: int) -> bool:
    """Remove the row of a workspace marked ``deleting``; whether there was one."""
    deleted = await sql.fetchval(
        "DELETE FROM uws_workspace WHERE id = $1 AND status = $2 RETURNING id",
        workspace_id, WorkspaceStatus.deleting)
    return deleted is not None


# --- scans -------------------------------------------------------------------------------


def current_details(scan: WorkspaceScan) -> dict[str, Any]:
    return {
        "files": [{"name": name} for name in scan.files],
        "symlinks": [{"name": name} for name in scan.symlinks],
    }


async def db_clock() -> datetime:
    """The database's clock: what scans are compared with (``db.quotas`` claims)."""
    clock: datetime = await sql.fetchval("SELECT clock_timestamp()")
    return clock


async def store_scan(workspace_id: int, scan: WorkspaceScan,
                     started: datetime | None = None) -> bool:
    """Write a scan's result; ``False`` when the workspace is gone or being deleted.

    With ``started`` (``db_clock()`` read before the walk), a result older than the one
    stored is dropped (the upkeep's scan and the workspace's own may overlap), and the disk
    claims of writes finished by then end in the same transaction: the scan counted them."""
    async with sql.transaction() as conn:
        updated = await conn.fetchval(
            "UPDATE uws_workspace SET disk_space = $2, current_workspace_details = $3::jsonb, "
            "disk_scanned = COALESCE($4::timestamptz, disk_scanned) WHERE id = $1 "
            "AND status <> $5 AND ($4::timestamptz IS NULL OR disk_scanned IS NULL "
            "OR disk_scanned <= $4::timestamptz) RETURNING id",
            workspace_id, scan.disk_space, json.dumps(current_details(scan)), started,
            WorkspaceStatus.deleting)
        if updated is None:
            # Dropped as older, or the workspace is gone (``False`` only for the latter).
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM uws_workspace WHERE id = $1 "
                "AND status <> $2)", workspace_id, WorkspaceStatus.deleting))
        if started is not None:
            await quotas.settle_after_scan(conn, workspace_id, started)
    return True


# --- races: a job's start, a deletion ------------------------------------------------------


async def lock(conn: Any, workspace_id: int) -> Any | None:
    """Lock the workspace's row until the end of the transaction; its current row."""
    return await conn.fetchrow(
        "SELECT * FROM uws_workspace WHERE id = $1 FOR NO KEY UPDATE", workspace_id)


@dataclass
class JobClaim:
    job: dict[str, Any] | None  # the inserted row, or None when refused
    status: str  # the workspace's status when refused ("deleting" if it is gone)


async def insert_job(workspace_id: int, user_id: int, job_type: str, resource_name: str,
                     resource_options: dict[str, Any], job_details: dict[str, Any]) -> JobClaim:
    """Mark the workspace ``active`` and insert the job row (``pending``), together, or
    neither when the workspace is not startable any more."""
    async with sql.transaction() as conn:
        row = await lock(conn, workspace_id)
        if row is None or row["status"] not in STARTABLE_WORKSPACE_STATUSES:
                return JobClaim(None, row["status"] if row else WorkspaceStatus.deleting)
        await conn.execute(
            "UPDATE uws_workspace SET status = $2, datetime_last_job_launch = now() "
            "WHERE id = $1", workspace_id, WorkspaceStatus.active)
        job = await conn.fetchrow(
            'INSERT INTO uws_job ("user", workspace, job_type, resource_name, resource_job_id, '
            "status, datetime_created, core_hours, resource_options, job_details) "
            "VALUES ($1, $2, $3, $4, -1, $7, now(), 0, $5::jsonb, $6::jsonb) "
            f"RETURNING {job_rows.COLUMNS}",
            user_id, workspace_id, job_type, resource_name, json.dumps(resource_options),
            json.dumps(job_details), JobStatus.pending)
    return JobClaim(dict(job), WorkspaceStatus.active)


class Deletion(Enum):
    queued = "queued"
    missing = "missing"
    pending_shares = "pending_shares"
    jobs_active = "jobs_active"


async def mark_deleting(workspace_id: int) -> Deletion:
    """Mark the workspace ``deleting`` unless a job is active in it or a share of it waits
    for acceptance (checked under its row lock, so no start or share slips in between)."""
    async with sql.transaction() as conn:
        if await lock(conn, workspace_id) is None:
            return Deletion.missing
        if await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM uws_shared_workspace_mapping "
            "WHERE original_workspace = $1 AND NOT is_accepted)", workspace_id
        ):
            return Deletion.pending_shares
        if await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM uws_job WHERE workspace = $1 AND status = ANY($2))",
            workspace_id, list(ACTIVE_JOB_STATUSES),
        ):
            return Deletion.jobs_active
        await conn.execute("UPDATE uws_workspace SET status = $2 WHERE id = $1",
                           workspace_id, WorkspaceStatus.deleting)
    return Deletion.queued
