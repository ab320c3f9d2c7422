"""Relaying one HTTP request and its response: the HTTP half of
:class:`~api.passthrough.relay.PassthroughRelay`, over the pooled client of
:mod:`api.passthrough.http_pool`.

Both bodies stream chunk by chunk with flow control both ways (constant memory); the
response body is relayed as sent (gzip passes through untouched, Content-Length stays
right).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import anyio
import h11

from api.passthrough.common import (
    NOT_ANSWERING,
    POOL_FULL,
    TIMED_OUT,
    Receive,
    Scope,
    Send,
    _Activity,
)
from api.passthrough.headers import RequestHeadersMixin, _response_headers, _target
from api.passthrough.http_pool import _Connection, _Pool, _UpstreamClosed
from api.passthrough.upstream import Upstream, upstream_authority

# A response this small arrives in one read: no need to watch for the client leaving.
_SMALL_BODY = 64 * 1024
# A request on a reused connection that the upstream closed before answering is retried
# once on a fresh connection when repeating it is harmless.
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamBrokenError(Exception):
    """The upstream failed after the response had started: the client connection must be
    dropped so the client sees a truncated response. Raised out of :meth:`PassthroughRelay.http`
    (uvicorn closes the connection when the app raises)."""


class _ClientGone(Exception):
    """The client disconnected while its request body was being relayed."""


class HttpRelayMixin(RequestHeadersMixin):
    """The HTTP half of :class:`~api.passthrough.relay.PassthroughRelay`. Its ``__init__``
    sets the attributes below."""

    _connect_timeout: float
    _read_timeout: float | None
    _max_connections: int
    _pool: _Pool | None

    async def http(self, scope: Scope, receive: Receive, send: Send, upstream: Upstream,
                   on_activity: Callable[[], None] | None = None) -> None:
        """Relay one request. Upstream refused or unreachable: 502; no answer (connect or
        response head) within the timeouts: 504; ``max_connections`` requests already in
        flight for ``connect_timeout``: 503; all with a JSON error body. A failure after the
        response started raises :class:`UpstreamBrokenError`.

        Timeouts: ``connect_timeout`` for the connection and for a free request slot;
        ``read_timeout`` between two reads from the upstream and for each write to it."""
        activity = _Activity(on_activity)
        activity.tick()
        pool = self._http_pool()
        if not await pool.acquire_slot():
            await _send_json_error(send, 503, POOL_FULL)
            return
        try:
            await self._exchange(pool, scope, receive, send, upstream, activity)
        finally:
            pool.slots.release()

    async def _exchange(self, pool: _Pool, scope: Scope, receive: Receive, send: Send,
                        upstream: Upstream, activity: _Activity) -> None:
        try:
            request, streamed = self._build_request(scope, upstream)
        except h11.LocalProtocolError as exc:  # a header h11 will not write
            await _send_json_error(send, 400, f"This request cannot be relayed: {exc}.")
            return
        body = _request_body(receive) if streamed else None
        try:
            conn, response = await self._send_request(pool, upstream, request, body)
        except _ClientGone:
            return  # nobody left to answer
        except TimeoutError:
            await _send_json_error(send, 504, TIMED_OUT)
            return
        except (OSError, h11.ProtocolError, _UpstreamClosed):
            await _send_json_error(send, 502, NOT_ANSWERING)
            return
        reusable = False
        try:
            headers = _response_headers(list(response.headers))
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": headers})
            reusable = await self._relay_body(conn, headers, receive, send, activity)
        finally:
            pool.release(conn, reusable)  # anything unfinished closes the connection

    def _build_request(self, scope: Scope, upstream: Upstream) -> tuple[h11.Request, bool]:
        """The upstream request, and whether a body is streamed into it."""
        authority = upstream_authority(upstream)
        headers = self._request_headers(scope, authority)
        length = next((v for n, v in scope["headers"] if n == b"content-length"), None)
        chunked = any(n == b"transfer-encoding" for n, _ in scope["headers"])
        if chunked and length is None:
            headers.append((b"transfer-encoding", b"chunked"))
        streamed = chunked or (length is not None and length.strip() != b"0")
        request = h11.Request(method=scope["method"], target=_target(scope), headers=headers)
        return request, streamed

    async def _send_request(self, pool: _Pool, upstream: Upstream, request: h11.Request,
                            body: AsyncIterator[bytes] | None
                            ) -> tuple[_Connection, h11.Response]:
        for attempt in range(2):
            conn, reused = await pool.checkout(upstream)
            try:
                return conn, await conn.send_request(request, body, self._read_timeout)
            except _UpstreamClosed:
                conn.close()
                retry = (reused and not attempt and body is None
                         and request.method.decode() in _RETRYABLE)
                if not retry:
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def _http_pool(self) -> _Pool:
        if self._pool is None:
            self._pool = _Pool(self._max_connections, self._connect_timeout)
        return self._pool

    async def _relay_body(self, conn: _Connection, headers: list[tuple[bytes, bytes]],
                          receive: Receive, send: Send, activity: _Activity) -> bool:
        """The response body to the client; whether the connection may be reused."""
        if _known_small(headers):  # one read, one send, no watcher
            body = b"".join([chunk async for chunk in self._body_chunks(conn)])
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return True
        # uvicorn's send() ignores a gone client, so a watcher on receive() tells us to stop
        # reading the upstream.
        with anyio.CancelScope() as cancel:
            watcher = asyncio.create_task(_cancel_on_disconnect(receive, cancel))
            try:
                async for chunk in self._body_chunks(conn):
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                    activity.tick()
            finally:
                watcher.cancel()
        if cancel.cancelled_caught:
            return False
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    async def _body_chunks(self, conn: _Connection) -> AsyncIterator[bytes]:
        while True:
            try:
                event = await conn.next_event(self._read_timeout)
            except (OSError, TimeoutError, h11.ProtocolError, _UpstreamClosed) as exc:
                raise UpstreamBrokenError(f"the session broke off its response: {exc!r}"
                                          ) from exc
            if type(event) is h11.Data:
                yield bytes(event.data)
            elif type(event) is h11.EndOfMessage:
                return
            else:
                raise UpstreamBrokenError(f"unexpected from the session: {event!r}")


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


def _known_small(headers: list[tuple[bytes, bytes]]) -> bool:
    length = next((v for n, v in headers if n == b"content-length"), None)
    return length is not None and length.isdigit() and int(length) <= _SMALL_BODY


async def _cancel_on_disconnect(receive: Receive, cancel: anyio.CancelScope) -> None:
    # Any request body left unread (an upstream that answered early) is discarded here.
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel.cancel()


async def _send_json_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"success": False, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
