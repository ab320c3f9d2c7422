"""When each interactive session was last used through the passthrough.

Requests and WebSocket traffic touch an in-memory stamp (cheap, on the hot path); a
background task writes the stamps to the jobs' ``job_details.metrics.last_activity`` every
few seconds, one statement for all of them, where the job's workflow can read it to stop
idle sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from db import jobs as job_rows

log = logging.getLogger("uws.activity")


class SessionActivity:
    def __init__(self, flush_seconds: float = 15.0) -> None:
        self._flush_seconds = flush_seconds
        self._touched: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    def touch_callback(self, job_id: int) -> Callable[[], None]:
        def touch() -> None:
            self._touched[job_id] = time.time()

        return touch

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="session-activity")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def flush(self) -> None:
        touched, self._touched = self._touched, {}
        if not touched:
            return
        try:
            await job_rows.record_session_activity(touched)
        except Exception as exc:
            log.warning("could not record session activity: %s", exc)
            for job_id, stamp in touched.items():
                self._touched.setdefault(job_id, stamp)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            await self.flush()
