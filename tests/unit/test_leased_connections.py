"""``LeasedConnections`` against the real PostgreSQL: bounded, fair, and it survives failed
and cancelled statements without leaking connections."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from db.connections import LeasedConnections


@pytest.fixture
async def pool(database_url: str):
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    yield p
    await p.close()


async def test_many_concurrent_reads_share_a_few_connections(pool) -> None:
    readers = LeasedConnections(pool, size=3)
    results = await asyncio.gather(*(readers.fetchrow("SELECT $1::int AS n", i)
                                     for i in range(200)))
    assert [r["n"] for r in results] == list(range(200))
    assert readers.open_count <= 3
    await readers.close()
    assert readers.open_count == 0


async def test_failed_statement_gives_the_connection_back(pool) -> None:
    readers = LeasedConnections(pool, size=2)
    with pytest.raises(asyncpg.UndefinedTableError):
        await readers.fetch("SELECT * FROM no_such_table")
    assert readers.open_count == 0
    assert (await readers.fetchrow("SELECT 1 AS one"))["one"] == 1
    await readers.close()


async def test_cancelled_statements_do_not_leak(pool) -> None:
    readers = LeasedConnections(pool, size=2)
    slow = [asyncio.create_task(readers.fetch("SELECT pg_sleep(5)")) for _ in range(5)]
    await asyncio.sleep(0.3)  # two run, three wait for a connection
    for task in slow:
        task.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
    assert readers.open_count == 0
    rows = await asyncio.wait_for(
        asyncio.gather(*(readers.fetchrow("SELECT 2 AS two") for _ in range(10))), timeout=10)
    assert all(r["two"] == 2 for r in rows)
    await readers.close()
    await asyncio.wait_for(pool.close(), timeout=10)  # nothing left checked out
