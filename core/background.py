"""A coroutine that runs beside a block of code and is cancelled when the block ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def running(work: Coroutine[Any, Any, Any], name: str | None = None) -> AsyncIterator[None]:
    """Run ``work`` as a task while the ``async with`` block runs; cancel it (and wait for
    it to end) when the block ends, however it ends."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
