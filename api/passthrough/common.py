"""What the HTTP and WebSocket relays share: the ASGI types, the error messages a client is
shown, and the throttle on ``on_activity``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NOT_ANSWERING = "The session is not answering. It may still be starting, or it has stopped."
TIMED_OUT = "The session did not answer in time."
POOL_FULL = "Too many requests to sessions at once; try again shortly."

ACTIVITY_INTERVAL_S = 5.0


class _Activity:
    """``on_activity`` at most every :data:`ACTIVITY_INTERVAL_S` seconds."""

    __slots__ = ("_callback", "_next")

    def __init__(self, callback: Callable[[], None] | None) -> None:
        self._callback = callback
        self._next = 0.0

    def tick(self) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + ACTIVITY_INTERVAL_S
            self._callback()
