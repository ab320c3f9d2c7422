"""How every module of ``db`` talks to PostgreSQL: SQL with ``$n`` parameters.

One style for every query: a statement written out in the module that owns its table, run
here. A single statement (a read, or a write that stands alone) runs on a few leased
connections (``db.connections``: no pool acquire and release per query, which cost about
as much as the query on the hot paths, ``bench/api_throughput.py``). Statements that must
commit together share ``transaction()``'s connection. The Piccolo tables (``db.tables``)
define the schema and its migrations; queries do not go through Piccolo's builder, whose
query construction cost several times the database's own time on those paths.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg

from db.connections import LeasedConnections

# One entry per open pool, the newest in use. A process normally has one; tests that run
# a second app in the same process get the first one's back when the second one closes.
_leased: list[LeasedConnections] = []


def attach(pool: asyncpg.Pool) -> None:
    _leased.append(LeasedConnections(pool))


async def detach(pool: asyncpg.Pool) -> None:
    """Give back the leased connections of ``pool`` (before that pool is closed)."""
    for leased in [entry for entry in _leased if entry.pool is pool]:
        _leased.remove(leased)
        await leased.close()


def _current() -> LeasedConnections:
    if not _leased:
        raise RuntimeError("the database pool is not open")
    return _leased[-1]


async def fetch(sql: str, *args: Any) -> list[asyncpg.Record]:
    return await _current().fetch(sql, *args)


async def fetchrow(sql: str, *args: Any) -> asyncpg.Record | None:
    return await _current().fetchrow(sql, *args)


async def fetchval(sql: str, *args: Any) -> Any:
    row = await _current().fetchrow(sql, *args)
    return row[0] if row is not None else None


async def fetch_int(sql: str, *args: Any) -> int | None:
    """The first column of the first row, as an int (``None``: no row, or NULL)."""
    value = await fetchval(sql, *args)
    return None if value is None else int(value)


async def fetch_str(sql: str, *args: Any) -> str | None:
    value = await fetchval(sql, *args)
    return None if value is None else str(value)


async def execute(sql: str, *args: Any) -> None:
    await _current().fetch(sql, *args)


async def ping() -> None:
    """Raise unless the database answers."""
    await fetchval("SELECT 1")


@asynccontextmanager
async def transaction() -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own inside one transaction: committed when the block ends,
    rolled back when it raises."""
    async with _current().pool.acquire() as conn, conn.transaction():
        yield conn


def as_json(value: Any) -> Any:
    """A JSONB column's value: asyncpg hands it over as text; accept a decoded one too."""
    if isinstance(value, str):
        return json.loads(value) if value else {}
    return value if value is not None else {}


def now() -> datetime:
    return datetime.now(UTC)
