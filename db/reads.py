"""Hot-path statements in plain SQL on a few leased connections.

Every authenticated request resolves a token and most read a row or a list; building
these through the ORM cost several times the database's own time (measured by
``bench/api_throughput.py``), so they are written once here, with asyncpg's per-connection
statement cache doing the rest. Writes stay in Piccolo.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from db.read_connections import ReadConnections

WORKSPACE_COLUMNS = (
    "w.id, w.name, w.description, w.disk_space, w.datetime_created, w.datetime_last_modified, "
    "w.datetime_last_job_launch, w.request_workspace_details, w.current_workspace_details, "
    "w.status, w.default_job_type"
)
# Shared copies their recipient has not accepted are not listed.
_ACCEPTED = ("NOT EXISTS (SELECT 1 FROM uws_shared_workspace_mapping m "
             "WHERE m.shared_workspace = w.id AND NOT m.is_accepted)")
_WORKSPACE_FILTERS = ("name", "description", "status")


# One entry per open pool, the newest in use. A process normally has one; tests that run
# a second app in the same process get the first one's back when the second one closes.
_readers: list[ReadConnections] = []


def attach(pool: Any) -> None:
    _readers.append(ReadConnections(pool))


async def detach(pool: Any) -> None:
    """Give back the leased connections of ``pool`` (before that pool is closed)."""
    for readers in [r for r in _readers if r.pool is pool]:
        _readers.remove(readers)
        await readers.close()


def _pool() -> ReadConnections:
    if not _readers:
        raise RuntimeError("the database pool is not open")
    return _readers[-1]


async def token_user(key: str) -> tuple[int, str] | None:
    row = await _pool().fetchrow(
        'SELECT u.id, u.username FROM uws_token t JOIN uws_user u ON u.id = t."user" '
        "WHERE t.key = $1 AND u.is_active", key)
    return (row["id"], row["username"]) if row else None


async def workspaces(user_id: int, filters: dict[str, str],
                     workspace_id: int | None = None) -> list[Any]:
    """The user's listed workspaces (optionally one id), with exact-match filters."""
    clauses = ['w."user" = $1', _ACCEPTED]
    args: list[Any] = [user_id]
    if workspace_id is not None:
        args.append(workspace_id)
        clauses.append(f"w.id = ${len(args)}")
    for name in _WORKSPACE_FILTERS:  # fixed names only: never a client's text in SQL
        if name in filters:
            args.append(filters[name])
            clauses.append(f"w.{name} = ${len(args)}")
    return await _pool().fetch(
        f"SELECT {WORKSPACE_COLUMNS} FROM uws_workspace w WHERE {' AND '.join(clauses)} "
        "ORDER BY w.id", *args)


async def fetch(sql: str, *args: Any) -> list[Any]:
    """Any one-statement read on the hot-path connections."""
    return await _pool().fetch(sql, *args)


async def fetchrow(sql: str, *args: Any) -> Any | None:
    return await _pool().fetchrow(sql, *args)


async def spend_ticket(nonce: str, ttl_seconds: float) -> bool:
    """Record a ticket as used; ``False`` if it was used before (tickets work once)."""
    row = await fetchrow(
        "INSERT INTO uws_spent_ticket (nonce, expires) VALUES ($1, now() + $2::interval) "
        "ON CONFLICT (nonce) DO NOTHING RETURNING id", nonce, timedelta(seconds=ttl_seconds))
    return row is not None


async def record_session_activity(stamps: dict[int, float]) -> None:
    """Write ``job_details.metrics.last_activity`` (unix seconds) for many jobs at once."""
    await fetch(
        "UPDATE uws_job j SET job_details = jsonb_set(j.job_details, "
        "'{metrics,last_activity}', to_jsonb(s.stamp)) "
        "FROM unnest($1::bigint[], $2::float8[]) AS s(id, stamp) "
        "WHERE j.id = s.id AND j.datetime_end IS NULL",
        list(stamps), list(stamps.values()))


async def last_session_activity(job_id: int) -> float | None:
    row = await fetchrow(
        "SELECT (job_details->'metrics'->>'last_activity')::float8 AS stamp, "
        "extract(epoch FROM datetime_start) AS started FROM uws_job WHERE id = $1", job_id)
    if row is None:
        return None
    return row["stamp"] or (float(row["started"]) if row["started"] is not None else None)
