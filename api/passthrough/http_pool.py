"""The upstream HTTP/1.1 client: keep-alive connections (:class:`_Connection`) and their
pool (:class:`_Pool`).

HTTP goes through a small pooled HTTP/1.1 client of our own: h11 (the protocol engine httpx
itself uses) on asyncio protocols. An ``httpx.AsyncClient`` was measured first: ~1 ms of CPU
per small relayed request, its pool's bookkeeping growing with the square of open
connections (324 req/s through the relay with 16 clients in ``bench/passthrough.py``); this
client costs ~0.15-0.2 ms whatever the concurrency (~4000 req/s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import h11

from api.passthrough.upstream import Upstream, _open_socket

# Idle upstream connections are closed after this (4-8 s), under uvicorn's 5 s keep-alive
# (Tornado's is an hour), so we hardly ever reuse one the server is closing.
KEEPALIVE_S = 4.0
# Upstream bytes buffered before we stop reading the socket (a slow client slows the session).
_READ_HIGH_WATER = 256 * 1024
_MAX_RESPONSE_HEAD = 64 * 1024


class _UpstreamClosed(Exception):
    """The upstream closed the connection before sending any byte of a response."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream: h11 parses, asyncio moves the bytes.

    The event loop watches idle connections for us: one the upstream closed is marked at
    once and never reused (no per-request socket probing)."""

    def __init__(self, pool: _Pool, upstream: Upstream) -> None:
        self.upstream = upstream
        self.idle_since = 0.0
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE_HEAD)
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._answered = False  # a byte of the current response arrived

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> None:
        self._eof = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._closed = True
        self._wake()
        self._pool.forget(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    # used by the relay

    def reusable(self, now: float) -> bool:
        return (not self._eof and not self._chunks and now - self.idle_since < KEEPALIVE_S
                and self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE)

    def finish_cycle(self) -> bool:
        """Ready the connection for its next request, if both sides ended cleanly."""
        if (self._eof or self.h11.our_state is not h11.DONE
                or self.h11.their_state is not h11.DONE):
            return False
        self.h11.start_next_cycle()
        return True

    def close(self) -> None:
        self._eof = self._closed = True
        if self._transport is not None:
            self._transport.close()

    async def send_request(self, request: h11.Request, body: AsyncIterator[bytes] | None,
                           timeout: float | None) -> h11.Response:
        """Send the request (streaming ``body``) and read the response head."""
        self._answered = False
        try:
            if body is None:  # one write, one packet
                await self._write(self.h11.send(request) + self.h11.send(h11.EndOfMessage()),
                                  timeout)
            else:
                await self._write(self.h11.send(request), timeout)
                async for chunk in body:
                    await self._write(self.h11.send(h11.Data(data=chunk)), timeout)
                await self._write(self.h11.send(h11.EndOfMessage()), timeout)
        except ConnectionError:
            pass  # the upstream may have answered early, then closed: read what it said
        while True:
            event = await self.next_event(timeout)
            if type(event) is h11.Response:
                return event
            if type(event) is not h11.InformationalResponse:  # 1xx are skipped
                raise h11.RemoteProtocolError(f"unexpected {event!r}")

    async def next_event(self, timeout: float | None) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self._read(timeout))

    async def _read(self, timeout: float | None) -> bytes:
        """What arrived (waiting up to ``timeout``); b"" once the upstream closed."""
        while not self._chunks and not self._eof:  # also woken by resume_writing()
            await self._wait(timeout)
        if not self._chunks:
            if not self._answered:
                raise _UpstreamClosed("the session closed the connection without answering")
            return b""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._answered = True
        if self._reading_paused and not self._closed:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return data

    async def _write(self, data: bytes, timeout: float | None) -> None:
        if self._closed or self._transport is None:
            raise ConnectionResetError("the session closed the connection")
        self._transport.write(data)
        while self._writing_paused and not self._closed:
            await self._wait(timeout)
        if self._closed:
            raise ConnectionResetError("the session closed the connection")

    async def _wait(self, timeout: float | None) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Pool:
    """Keep-alive connections per upstream, newest reused first.

    ``slots`` bounds the requests in flight (``max_connections``); as many idle connections
    may be kept, each for :data:`KEEPALIVE_S` at most."""

    def __init__(self, max_connections: int, connect_timeout: float) -> None:
        self.slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_connections
        self._connect_timeout = connect_timeout
        self._idle: dict[Upstream, list[_Connection]] = {}
        self._idle_count = 0
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._closed = False

    async def acquire_slot(self) -> bool:
        """A slot for one request, waiting up to the connect timeout; False if none."""
        if not self.slots.locked():
            await self.slots.acquire()  # returns at once: no timer to arm
            return True
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.slots.acquire()
        except TimeoutError:
            return False
        return True

    async def checkout(self, upstream: Upstream) -> tuple[_Connection, bool]:
        """A connection to ``upstream`` and whether it was reused."""
        idle = self._idle.get(upstream)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if conn.reusable(now):
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            sock = await _open_socket(upstream, self._connect_timeout)
            try:
                _, conn = await loop.create_connection(lambda: _Connection(self, upstream),
                                                       sock=sock)
            except BaseException:
                sock.close()
                raise
        return conn, False

    def release(self, conn: _Connection, reusable: bool) -> None:
        if (not reusable or self._closed or self._idle_count >= self._max_idle
                or not conn.finish_cycle()):
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.upstream, []).append(conn)
        self._idle_count += 1
        if self._sweep_timer is None:
            self._sweep_timer = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._sweep)

    def forget(self, conn: _Connection) -> None:
        """A connection was lost: out of the idle lists if it was there."""
        idle = self._idle.get(conn.upstream)
        if idle and conn in idle:
            idle.remove(conn)
            self._idle_count -= 1
            if not idle:
                del self._idle[conn.upstream]

    def close(self) -> None:
        self._closed = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        self._idle.clear()
        self._idle_count = 0

    def _sweep(self) -> None:
        """Close connections idle too long, so sessions nobody uses hold no sockets."""
        self._sweep_timer = None
        now = time.monotonic()
        for upstream, idle in list(self._idle.items()):
            expired = [c for c in idle if now - c.idle_since >= KEEPALIVE_S]
            for conn in expired:
                idle.remove(conn)
                self._idle_count -= 1
                conn.close()
            if not idle:
                del self._idle[upstream]
        if self._idle_count and not self._closed:
            self._sweep_timer = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._sweep)
