"""Job rows: what clients read, status writes (each with its NOTIFY) and finalization,
each write in one transaction; the sessions' activity stamps; what upkeep and metrics count.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from core.status import ACTIVE_JOB_STATUSES, JobStatus, WorkspaceStatus
from db import sql

NOTIFY_CHANNEL = "uws_job_status"
# Every column, in the table's order (what the API's job listing shows).
COLUMNS = ('id, "user", workspace, job_type, resource_name, resource_job_id, status, '
           "datetime_created, datetime_start, datetime_end, core_hours, resource_options, "
           "job_details")

# Which current statuses a write of a given status may replace. Terminal statuses are set
# only by finalize; a late "running" never overwrites a user's "stopping".
_MAY_REPLACE: dict[str, tuple[JobStatus, ...]] = {
    JobStatus.pending: (JobStatus.pending,),
    JobStatus.running: (JobStatus.pending, JobStatus.running),
    JobStatus.stopping: (JobStatus.pending, JobStatus.running, JobStatus.stopping),
}


def event_payload(row: dict[str, Any]) -> str:
    """What subscribers receive, kept under PostgreSQL's 8000-byte NOTIFY limit."""
    details = sql.as_json(row["job_details"])
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
    metrics = sql.as_json(row["job_details"]).get("metrics") or {}
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
    statement = (f"UPDATE uws_job SET {', '.join(sets)} "
                 f"WHERE id = $1 AND status = ANY(${len(args)}) RETURNING {_RETURNING}")
    async with sql.transaction() as conn:
        row = await conn.fetchrow(statement, *args)
        if row is None:
            return False
        await _publish(conn, dict(row))
    return True


async def record_event(job_id: int, event: str) -> bool:
    """Show ``event`` as an active job's last event (a retry, say), status unchanged."""
    async with sql.transaction() as conn:
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


async def finalize(job_id: int, status: str, core_hours: float,
                   detail: str) -> dict[str, Any] | None:
    """End a job: status, end time, core-hours, the user's usage, the workspace back to
    ``idle`` when none of its jobs is active any more. Idempotent."""
    async with sql.transaction() as conn:
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
                "UPDATE uws_workspace SET status = $3 WHERE id = $1 AND status = $4 "
                "AND NOT EXISTS (SELECT 1 FROM uws_job WHERE workspace = $1 "
                "AND status = ANY($2))",
                row["workspace"], list(ACTIVE_JOB_STATUSES), WorkspaceStatus.idle,
                WorkspaceStatus.active,
            )
        await _publish(conn, row)
    return row


async def set_time_limit(job_id: int, minutes: float) -> None:
    """The job's time limit after an extension, in its metrics (what clients count down)."""
    async with sql.transaction() as conn:
        await conn.execute(
            "UPDATE uws_job SET job_details = jsonb_set(job_details, "
            "'{metrics,time_limit_min}', to_jsonb($2::float8)) WHERE id = $1", job_id, minutes)


async def add_reservation(job_id: int, amount: float) -> None:
    """Record more reserved core-hours on a job (an extension), released at finalize."""
    async with sql.transaction() as conn:
        await conn.execute(
            "UPDATE uws_job SET job_details = jsonb_set(job_details, "
            "'{metrics,reserved_core_hours}', to_jsonb(COALESCE((job_details->'metrics'->>"
            "'reserved_core_hours')::float8, 0) + $2)) WHERE id = $1",
            job_id, amount,
        )


# --- what clients read -----------------------------------------------------------------


async def owned(user_id: int, job_id: int) -> dict[str, Any] | None:
    row = await sql.fetchrow(f'SELECT {COLUMNS} FROM uws_job WHERE id = $1 AND "user" = $2',
                             job_id, user_id)
    return dict(row) if row else None


async def listing(user_id: int, *, job_id: int | None = None, workspace_id: int | None = None,
                  resource_job_id: int | None = None, job_type: str | None = None,
                  status: str | None = None) -> list[dict[str, Any]]:
    """The user's jobs, oldest first, matching every filter given."""
    clauses: list[str] = ['"user" = $1']
    args: list[Any] = [user_id]
    for column, value in (("id", job_id), ("workspace", workspace_id),
                          ("resource_job_id", resource_job_id), ("job_type", job_type),
                          ("status", status)):
        if value is not None:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    rows = await sql.fetch(
        f"SELECT {COLUMNS} FROM uws_job WHERE {' AND '.join(clauses)} ORDER BY id", *args)
    return [dict(row) for row in rows]


_EVENT_COLUMNS = "id, workspace, status, job_details"


async def event_rows(user_id: int, job_id: int) -> list[dict[str, Any]]:
    """What a job's status socket shows first: the job, if it is the user's."""
    rows = await sql.fetch(f'SELECT {_EVENT_COLUMNS} FROM uws_job WHERE id = $1 AND "user" = $2',
                           job_id, user_id)
    return [dict(row) for row in rows]


async def active_event_rows(user_id: int, also: list[int]) -> list[dict[str, Any]]:
    """The user's active jobs, and the jobs ``also`` names (whatever their status)."""
    rows = await sql.fetch(
        f'SELECT {_EVENT_COLUMNS} FROM uws_job WHERE "user" = $1 '
        "AND (status = ANY($2) OR id = ANY($3)) ORDER BY id",
        user_id, list(ACTIVE_JOB_STATUSES), also)
    return [dict(row) for row in rows]


async def session_of(job_id: int) -> dict[str, Any] | None:
    """Whose job it is, its status and details: what the passthrough decides on."""
    row = await sql.fetchrow('SELECT "user", status, job_details FROM uws_job WHERE id = $1',
                             job_id)
    return dict(row) if row else None


# --- sessions' activity ----------------------------------------------------------------


async def record_session_activity(stamps: dict[int, float]) -> None:
    """Write ``job_details.metrics.last_activity`` (unix seconds) for many jobs at once."""
    await sql.execute(
        "UPDATE uws_job j SET job_details = jsonb_set(j.job_details, "
        "'{metrics,last_activity}', to_jsonb(s.stamp)) "
        "FROM unnest($1::bigint[], $2::float8[]) AS s(id, stamp) "
        "WHERE j.id = s.id AND j.datetime_end IS NULL",
        list(stamps), list(stamps.values()))


async def last_session_activity(job_id: int) -> float | None:
    row = await sql.fetchrow(
        "SELECT (job_details->'metrics'->>'last_activity')::float8 AS stamp, "
        "extract(epoch FROM datetime_start) AS started FROM uws_job WHERE id = $1", job_id)
    if row is None:
        return None
    return row["stamp"] or (float(row["started"]) if row["started"] is not None else None)


# --- upkeep and metrics ----------------------------------------------------------------


async def unfinished_since(age: timedelta) -> list[int]:
    """Active jobs created more than ``age`` ago (their workflow should exist by then)."""
    rows = await sql.fetch(
        "SELECT id FROM uws_job WHERE status = ANY($1) AND datetime_end IS NULL "
        "AND datetime_created < now() - $2::interval ORDER BY id",
        list(ACTIVE_JOB_STATUSES), age)
    return [row["id"] for row in rows]


async def counts() -> list[tuple[str, str, int]]:
    """(status, resource name, number of jobs) for every pair that has jobs."""
    rows = await sql.fetch(
        "SELECT status, resource_name, count(*) FROM uws_job GROUP BY 1, 2")
    return [(row["status"], row["resource_name"], row["count"]) for row in rows]
