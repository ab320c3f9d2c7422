"""Job rows: status writes (with their NOTIFY) and finalization, each in one transaction."""

from __future__ import annotations

import json
from typing import Any

from db.queries import as_json
from db.tables import ACTIVE_JOB_STATUSES, Job

NOTIFY_CHANNEL = "uws_job_status"

# Which current statuses a write of a given status may replace. Terminal statuses are set
# only by finalize; a late "running" never overwrites a user's "stopping".
_MAY_REPLACE: dict[str, tuple[str, ...]] = {
    "pending": ("pending",),
    "running": ("pending", "running"),
    "stopping": ("pending", "running", "stopping"),
}


def event_payload(row: dict[str, Any]) -> str:
    """What subscribers receive, kept under PostgreSQL's 8000-byte NOTIFY limit."""
    details = as_json(row["job_details"])
    payload = {
        "id": row["id"],
        "user_id": row["user"],
        "workspace_id": row["workspace"],
        "status": row["status"],
        "current_job_details": details.get("current_job_details", {}),
    }
    text = json.dumps(payload)
    if len(text) > 7900:
        payload["current_job_details"] = {"truncated": True}
        text = json.dumps(payload)
    return text


def _reserved(row: dict[str, Any]) -> float:
    metrics = as_json(row["job_details"]).get("metrics") or {}
    return float(metrics.get("reserved_core_hours") or 0.0)


async def _publish(conn: Any, row: dict[str, Any]) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, event_payload(row))


_RETURNING = 'id, "user", workspace, status, job_details'


async def record_status(
    job_id: int, status: str, *, resource_job_id: int | None = None, set_start: bool = False,
    current_job_details: dict[str, Any] | None = None, event: str = "",
) -> bool:
    """Write one status change and publish it, in one transaction."""
    sets = ["status = $2"]
    args: list[Any] = [job_id, status]
    if resource_job_id is not None:
        args.append(resource_job_id)
        sets.append(f"resource_job_id = ${len(args)}")
    if set_start:
        sets.append("datetime_start = COALESCE(datetime_start, now())")
    merged = {**(current_job_details or {}), **({"last_event": event} if event else {})}
    if merged:
        args.append(json.dumps(merged))
        sets.append(
            "job_details = jsonb_set(job_details, '{current_job_details}', "
            f"COALESCE(job_details->'current_job_details', '{{}}'::jsonb) || ${len(args)}::jsonb)"
        )
    args.append(list(_MAY_REPLACE.get(status, ())))
    sql = (f"UPDATE uws_job SET {', '.join(sets)} "
           f"WHERE id = $1 AND status = ANY(${len(args)}) RETURNING {_RETURNING}")
    async with Job._meta.db.transaction() as tx:
        conn = tx.connection
        row = await conn.fetchrow(sql, *args)
        if row is None:
            return False
        await _publish(conn, dict(row))
    return True


async def record_event(job_id: int, event: str) -> bool:
    """Show ``event`` as an active job's last event (a retry, say), status unchanged."""
    async with Job._meta.db.transaction() as tx:
        conn = tx.connection
        row = await conn.fetchrow(
            "UPDATE uws_job SET job_details = jsonb_set(job_details, '{current_job_details}', "
            "COALESCE(job_details->'current_job_details', '{}'::jsonb) || "
            "jsonb_build_object('last_event', $2::text)) "
            f"WHERE id = $1 AND status = ANY($3) RETURNING {_RETURNING}",
            job_id, event, list(ACTIVE_JOB_STATUSES),
        )
        if row is None:
            return False
        await _publish(conn, dict(row))
    return True


async def finalize(job_id: int, status: str, core_hours: float, detail: str) -> dict | None:
    """End a job: status, end time, core-hours, the user's usage, the workspace back to
    ``idle`` when none of its jobs is active any more. Idempotent."""
    async with Job._meta.db.transaction() as tx:
        conn = tx.connection
        row = await conn.fetchrow(
            "UPDATE uws_job SET status = $2, core_hours = $3, "
            "datetime_end = COALESCE(datetime_end, now()), "
            "job_details = jsonb_set(job_details, '{current_job_details}', "
            "COALESCE(job_details->'current_job_details', '{}'::jsonb) || "
            "jsonb_build_object('message', $4::text)) "
            f"WHERE id = $1 AND datetime_end IS NULL RETURNING {_RETURNING}",
            job_id, status, core_hours, detail,
        )
        if row is None:
            return None  # finalized already (a retried activity)
        row = dict(row)
        # Settle the quota: the launch's reservation becomes the real use.
        await conn.execute(
            "UPDATE uws_user_quota SET used_core_hours = used_core_hours + $2, "
            "reserved_core_hours = GREATEST(reserved_core_hours - $3, 0) "
            'WHERE "user" = $1', row["user"], core_hours, _reserved(row),
        )
        if row["workspace"] is not None:
            await conn.execute(
                "UPDATE uws_workspace SET status = 'idle' WHERE id = $1 AND status = 'active' "
                "AND NOT EXISTS (SELECT 1 FROM uws_job WHERE workspace = $1 "
                "AND status = ANY($2))",
                row["workspace"], list(ACTIVE_JOB_STATUSES),
            )
        await _publish(conn, row)
    return row


async def set_time_limit(job_id: int, minutes: float) -> None:
    """The job's time limit after an extension, in its metrics (what clients count down)."""
    async with Job._meta.db.transaction() as tx:
        await tx.connection.execute(
            "UPDATE uws_job SET job_details = jsonb_set(job_details, "
            "'{metrics,time_limit_min}', to_jsonb($2::float8)) WHERE id = $1", job_id, minutes)


async def add_reservation(job_id: int, amount: float) -> None:
    """Record more reserved core-hours on a job (an extension), released at finalize."""
    async with Job._meta.db.transaction() as tx:
        await tx.connection.execute(
            "UPDATE uws_job SET job_details = jsonb_set(job_details, "
            "'{metrics,reserved_core_hours}', to_jsonb(COALESCE((job_details->'metrics'->>"
            "'reserved_core_hours')::float8, 0) + $2)) WHERE id = $1",
            job_id, amount,
        )
