"""Workspace state changes that race each other: starting a job, deleting, sharing.

Each is decided in one transaction that first locks the workspace's row, then checks
with fresh statements (READ COMMITTED: each sees what committed before the lock was
granted) and acts. So of a start and a delete sent together exactly one wins, in any API
process, and the loser sees the winner's result: never a job in a workspace that is being
removed, never a deletion under a job that was just inserted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from db.tables import ACTIVE_JOB_STATUSES, Job, Workspace

_JOB_COLUMNS = ", ".join(f'"{c._meta.db_column_name}"' for c in Job.all_columns())
# Statuses a job may start from: ``active`` already runs one (several may run at once).
STARTABLE = ("idle", "active")


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
    async with Workspace._meta.db.transaction() as tx:
        conn = tx.connection
        row = await lock(conn, workspace_id)
        if row is None or row["status"] not in STARTABLE:
            return JobClaim(None, row["status"] if row else "deleting")
        await conn.execute(
            "UPDATE uws_workspace SET status = 'active', datetime_last_job_launch = now() "
            "WHERE id = $1", workspace_id)
        job = await conn.fetchrow(
            'INSERT INTO uws_job ("user", workspace, job_type, resource_name, resource_job_id, '
            "status, datetime_created, core_hours, resource_options, job_details) "
            "VALUES ($1, $2, $3, $4, -1, 'pending', now(), 0, $5::jsonb, $6::jsonb) "
            f"RETURNING {_JOB_COLUMNS}",
            user_id, workspace_id, job_type, resource_name, json.dumps(resource_options),
            json.dumps(job_details))
    return JobClaim(dict(job), "active")


class Deletion(Enum):
    queued = "queued"
    missing = "missing"
    pending_shares = "pending_shares"
    jobs_active = "jobs_active"


async def mark_deleting(workspace_id: int) -> Deletion:
    """Mark the workspace ``deleting`` unless a job is active in it or a share of it waits
    for acceptance (checked under its row lock, so no start or share slips in between)."""
    async with Workspace._meta.db.transaction() as tx:
        conn = tx.connection
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
        await conn.execute("UPDATE uws_workspace SET status = 'deleting' WHERE id = $1",
                           workspace_id)
    return Deletion.queued


async def status_of(workspace_id: int) -> str | None:
    row = await Workspace.select(Workspace.status).where(Workspace.id == workspace_id).first()
    return row["status"] if row else None
