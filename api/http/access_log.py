"""``uws api --access-log``: one line per request, method, path, status and duration.

uvicorn's own access log is never used: it prints the query string, where passthrough
tickets (``uws_ticket``) and WebSocket tokens (``?token=``) travel, and ``--log-level``
above ``info`` silences it."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

logger = logging.getLogger("uws.access")
# Set in the scope by api.http.guard when it answered for a running app (a body deadline).
REFUSED_SCOPE_KEY = "uws.refused_status"
# nginx's code for "the client went away before the answer".
CLIENT_GONE = 499


def access_path(scope: Any) -> str:
    """The request's path as sent (percent-encoded, so no control character reaches a log
    line), never its query string."""
    raw = scope.get("raw_path")
    if raw:
        return raw.decode("ascii", "backslashreplace")
    return str(scope.get("path", "-")).encode("ascii", "backslashreplace").decode("ascii")


def access_log(method: str, path: str, status: int, seconds: float) -> None:
    duration_ms = round(seconds * 1000, 1)
    logger.info("%s %s %d %.1fms", method, path, status, duration_ms,
                extra={"method": method, "path": path, "status": status,
                       "duration_ms": duration_ms})


class AccessLog:
    """ASGI middleware logging each HTTP request when its answer is complete, and each
    WebSocket when it ends (status 101 once accepted, else the refusal's)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope.get("method", "GET") if kind == "http" else "WEBSOCKET"
        status: int | None = None
        gone = logged = False

        def log() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            # An app that failed before answering gets uvicorn's 500.
            code = scope.get(REFUSED_SCOPE_KEY) or (CLIENT_GONE if gone else status or 500)
            access_log(method, access_path(scope), code, time.perf_counter() - started)

        async def receiving() -> Any:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and status is None:
                gone = True
            return message

        async def sending(message: Any) -> None:
            nonlocal status
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.close" and status is None:
                status = 403  # closed before accepting: uvicorn answers 403
            await send(message)
            if kind == "http.response.body" and not message.get("more_body", False):
                log()

        try:
            await self.app(scope, receiving, sending)
        finally:
            log()
