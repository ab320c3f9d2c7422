"""A few pooled connections kept checked out for single statements (db.sql).

asyncpg's pool spends about as long on an acquire/release pair (it starts a task per
release) as a simple query takes on the wire; measured here, that was a quarter of an
authenticated ``GET /workspaces/{id}/``. Single statements need no session of their own,
so they share a handful of connections handed out in turn. A connection whose statement
fails or is cancelled goes back to the pool, which knows how to clean it up or drop it; the
next statement opens a fresh one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

import asyncpg


class LeasedConnections:
    def __init__(self, pool: asyncpg.Pool, size: int = 8) -> None:
        self._pool = pool
        self._size = size
        self._open = 0
        self._idle: deque[asyncpg.Connection] = deque()
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await self._checkout()
        try:
            rows = await conn.fetch(sql, *args)
        except BaseException:
            self._discard(conn)
            raise
        self._checkin(conn)
        return cast(list[asyncpg.Record], rows)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    @property
    def open_count(self) -> int:
        return self._open

    async def close(self) -> None:
        """Give every connection back to the pool (before the pool itself closes)."""
        while self._idle:
            # Released even when the server dropped it: asyncpg then frees its slot (and
            # releasing a connection it already reclaimed does nothing).
            await self._pool.release(self._idle.popleft())
            self._open -= 1
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _checkout(self) -> asyncpg.Connection:
        while True:
            if self._idle:
                conn = self._idle.popleft()
                if not _gone(conn):
                    return conn
                # The server dropped it (a restart): hand it back and lease another.
                self._discard(conn, hand_over=False)
                continue
            if self._open < self._size:
                self._open += 1
                try:
                    return await self._pool.acquire()
                except BaseException:
                    self._open -= 1
                    self._hand_over(None)
                    raise
            waiter: asyncio.Future[asyncpg.Connection | None] = \
                asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                conn = await waiter
            except asyncio.CancelledError:
                # Handed a connection (or a free slot) just as we were cancelled: pass it on.
                if waiter.done() and not waiter.cancelled():
                    self._hand_over(waiter.result())
                raise
            if conn is not None:
                return conn
            # None: a slot freed up; loop to open a connection for it.

    def _checkin(self, conn: asyncpg.Connection) -> None:
        if not self._hand_over(conn):
            self._idle.append(conn)

    def _discard(self, conn: asyncpg.Connection, *, hand_over: bool = True) -> None:
        self._open -= 1
        task = asyncio.ensure_future(self._pool.release(conn))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        if hand_over:
            self._hand_over(None)

    def _hand_over(self, conn: asyncpg.Connection | None) -> bool:
        """Give ``conn`` (or, with ``None``, a free slot) to the first live waiter."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False


def _gone(conn: asyncpg.Connection) -> bool:
    """Whether a leased connection was lost (the server closed it); once asyncpg has
    cleaned it up, its proxy is detached and even asking raises."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True
