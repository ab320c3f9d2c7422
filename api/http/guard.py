"""HTTP/1.1 limits below the ASGI app: header size and count, header and body read
deadlines, the connection limit, all answered in the contract's envelope.

uvicorn's httptools protocol has none of these but ``limit_concurrency`` (answered in plain
text): llhttp buffers headers of any size, and once a request's first byte is in, nothing
times out a client that dribbles its headers or stops sending its body. This subclass
adds them with one timer per connection, re-armed lazily (no timer work per chunk).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.http.access_log import REFUSED_SCOPE_KEY, access_log
from core.settings import Settings

Phase = Literal["idle", "headers", "body", "lingering", "closed"]
# After a refusal, how long unread input is still drained: closing a socket with unread
# data sends a RST, and the client may then lose the answer it has not read yet.
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    max_header_count: int
    header_timeout: float
    body_timeout: float
    max_connections: int | None
    access_log: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, access_log: bool = False) -> HttpLimits:
        return cls(max_header_bytes=settings.max_header_bytes,
                   max_header_count=settings.max_header_count,
                   header_timeout=settings.header_timeout_seconds,
                   body_timeout=settings.body_timeout_seconds,
                   max_connections=settings.max_connections or None,
                   access_log=access_log)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; answered once feed_data returns."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


HEADERS_TOO_LARGE = "Request headers are too large."
TOO_MANY_HEADERS = "Too many request headers."
HEADERS_TIMEOUT = "Request headers were not received in time."
BODY_TIMEOUT = "Request body was not received in time."
BUSY = "The server has too many open connections. Please try again shortly."


def _envelope_bytes(message: str) -> bytes:
    return json.dumps({"success": False, "message": message}, separators=(",", ":")).encode()


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """What uvicorn's limit_concurrency answers, in the envelope."""
    body = _envelope_bytes(BUSY)
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection. Phases: ``headers`` (deadline: the whole header), ``body`` (deadline:
    each pause between reads), ``idle`` (nothing awaited from the client: the app works,
    or uvicorn's keep-alive timeout runs), ``lingering`` (refused: input is dropped until
    the client closes) and ``closed`` (gone, or handed to the WebSocket protocol)."""

    limits: HttpLimits  # set by guarded_protocol()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._app = self.app
        # Checked here, in the envelope, and for WebSocket upgrades too (uvicorn skips them).
        self.limit_concurrency = None
        self._phase: Phase = "idle"
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._header_count = 0
        self._buffered = 0  # bytes received in later reads while still in the headers
        self._messages = 0
        self._started = 0.0
        self._refusal: _Refused | None = None  # what a parser callback stopped on

    # --- the deadline ------------------------------------------------------------------

    def _expect(self, phase: Phase, seconds: float) -> None:
        self._phase = phase
        self._deadline = self.loop.time() + seconds
        if self._timer is None or self._timer.when() > self._deadline:
            self._cancel_timer()
            self._timer = self.loop.call_at(self._deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        if self._phase == "body" and (self.flow.read_paused or (
                self.cycle is not None and self.cycle.waiting_for_100_continue)):
            # We are the ones not reading (back-pressure, a pipelined request, a client
            # waiting for our 100 Continue): that time is not the client's.
            self._deadline = now + self.limits.body_timeout
        if self._phase not in ("headers", "body"):
            return
        if now < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        if self._phase == "headers":
            # A connection that never sent a byte (a browser's spare one) is just closed.
            self._refuse(408, HEADERS_TIMEOUT, answer=self._messages > 0)
        else:
            self._refuse(408, BODY_TIMEOUT)

    # --- answering without the app -----------------------------------------------------

    def _refuse(self, status: int, message: str, *, answer: bool = True) -> None:
        """Answer ``status`` in the envelope (if nothing else is being answered on this
        connection) and close; a running app gets http.disconnect."""
        phase, self._phase = self._phase, "closed"
        self._cancel_timer()
        if self.transport.is_closing():
            return
        # In the headers, ``cycle`` is the previous request's; in the body, this one's.
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # nothing the app sends later reaches the socket
            cycle.message_event.set()
        # Never write into (or after) another answer on this connection.
        if phase == "body":
            answer = answer and cycle is not None and not cycle.response_started
        else:
            answer = answer and (cycle is None or cycle.response_complete)
        if phase == "body" and cycle is not None:
            # The app still runs: the access log writes its line, with this status.
            cycle.scope[REFUSED_SCOPE_KEY] = status  # type: ignore[literal-required]
        elif self.limits.access_log and answer:
            # Before the app: the request line may be unfinished, so no method or path.
            access_log("-", "-", status, time.perf_counter() - self._started)
        if not answer:
            self.transport.close()
            return
        body = _envelope_bytes(message)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: ", str(len(body)).encode(), b"\r\n",
                 b"connection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        self._close_lingering()

    def _close_lingering(self) -> None:
        """Send FIN after the answer, drop what still arrives, close at the client's own
        FIN (eof_received) or after LINGER_SECONDS."""
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._phase = "lingering"
        self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    # --- protocol and parser callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._started = time.perf_counter()
        self._expect("headers", self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = "closed"
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase in ("lingering", "closed"):
            return
        message, in_headers = self._messages, self._phase == "headers"
        if self._phase == "body":
            self._deadline = self.loop.time() + self.limits.body_timeout
        self._feed(data)
        # llhttp holds an unfinished header line whole: bound what it may buffer. Reads
        # in which the request began are left out (they may carry an earlier body).
        if self._phase == "headers" and in_headers and message == self._messages:
            self._buffered += len(data)
            if self._buffered > self.limits.max_header_bytes:
                self._refuse(431, HEADERS_TOO_LARGE)

    def _feed(self, data: bytes) -> None:
        """uvicorn's data_received, with refusals and parse errors in the envelope."""
        self._unset_keepalive_if_required()
        self._refusal = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            refused = self._refusal
            if refused is not None:  # raised by one of our callbacks below
                self._refuse(refused.status, refused.message)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self._refuse(400, "Invalid HTTP request received.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._messages += 1
        self._header_bytes = self._header_count = self._buffered = 0
        self._started = time.perf_counter()
        if self._phase != "headers":  # the first request keeps the connection's deadline
            self._expect("headers", self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_header_count:
            self._stop(431, TOO_MANY_HEADERS)
        self._count_header_bytes(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            self._stop(431, HEADERS_TOO_LARGE)

    def _stop(self, status: int, message: str) -> None:
        self._refusal = _Refused(status, message)
        raise self._refusal

    def on_headers_complete(self) -> None:
        limit = self.limits.max_connections
        over = limit is not None and (
            len(self.connections) >= limit or len(self.tasks) >= limit)
        if over and self.parser.should_upgrade():
            self._refuse(503, BUSY)  # handle_websocket_upgrade then sees the closing transport
            return
        self._expect("body", self.limits.body_timeout)
        self.app = _busy if over else self._app
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._phase == "body":
            self._phase = "idle"
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        if self._phase in ("lingering", "closed") or self.transport.is_closing():
            return  # refused in on_headers_complete
        self._phase = "closed"  # the connection is the WebSocket protocol's from here
        self._cancel_timer()
        super().handle_websocket_upgrade()


def guarded_protocol(limits: HttpLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's ``http=``, bound to ``limits``."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
