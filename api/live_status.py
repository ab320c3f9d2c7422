"""Job status fan-out: one PostgreSQL ``LISTEN`` per API process, many WebSocket clients.

Status writes publish a ``NOTIFY`` in the same transaction (``db/jobs.py``), so every API
replica receives every change, whichever replica or worker made it. When the listening
connection drops, the bus reconnects and tells subscribers to resend the current state,
so a missed notification costs one refresh, never a stale screen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from db.jobs import NOTIFY_CHANNEL

log = logging.getLogger("uws.live")

RESYNC = {"type": "resync"}  # what subscribers get after the bus reconnected


@dataclass(eq=False)
class Subscription:
    user_id: int
    job_id: int | None  # None: all of the user's jobs
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(1000))

    def offer(self, event: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # A client that stopped reading: drop the backlog, ask it to resync instead.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(RESYNC)


class JobEventBus:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._by_job: dict[int, set[Subscription]] = defaultdict(set)
        self._by_user: dict[int, set[Subscription]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-event-bus")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(self, user_id: int, job_id: int | None) -> Subscription:
        sub = Subscription(user_id=user_id, job_id=job_id)
        if job_id is None:
            self._by_user[user_id].add(sub)
        else:
            self._by_job[job_id].add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        index, key = (self._by_user, sub.user_id) if sub.job_id is None else \
            (self._by_job, sub.job_id)
        subs = index.get(key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del index[key]

    def dispatch(self, event: dict[str, Any]) -> None:
        for sub in self._by_job.get(event.get("id"), ()):
            if sub.user_id == event.get("user_id"):
                sub.offer(event)
        for sub in self._by_user.get(event.get("user_id"), ()):
            sub.offer(event)

    def _resync_all(self) -> None:
        for index in (self._by_job, self._by_user):
            for subs in index.values():
                for sub in subs:
                    sub.offer(RESYNC)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            log.warning("ignoring a malformed job event: %r", payload[:200])
            return
        self.dispatch(event)

    async def _run(self) -> None:
        backoff = 0.5
        first = True
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self._connected.set()
                if not first:
                    log.info("job event bus reconnected")
                    self._resync_all()
                first, backoff = False, 0.5
                await lost.wait()
                log.warning("job event bus lost its database connection")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job event bus cannot listen (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
