"""Heartbeats for activities whose work is one long call (a big ``rmtree`` or scan):
Temporal learns the worker is alive, and a dead worker's attempt is retried elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from temporalio import activity

from core.background import running


@contextlib.asynccontextmanager
async def heartbeating(every: float = 10.0) -> AsyncIterator[None]:
    if activity.info().is_local:
        # A local activity lives inside its workflow task, which the worker keeps alive;
        # Temporal takes no heartbeat from it.
        yield
        return

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(every)

    async with running(beat()):
        yield
