"""Relaying a WebSocket: the WebSocket half of :class:`~api.passthrough.relay.PassthroughRelay`.

WebSockets use the ``websockets`` client; the client's handshake is answered only once the
upstream's succeeded. Messages then flow both ways until either side closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from api.passthrough.common import NOT_ANSWERING, TIMED_OUT, Receive, Scope, Send, _Activity
from api.passthrough.headers import RequestHeadersMixin, _response_headers, _target
from api.passthrough.upstream import Upstream, _open_socket, upstream_authority

# Close codes an endpoint may send (RFC 6455 7.4); 1004-1006 and 1015 are reserved.
_SENDABLE_CLOSE = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


class _Connect(connect):
    """The ``websockets`` client, minus its redirect following: the client gets the 3xx."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


class WebSocketRelayMixin(RequestHeadersMixin):
    """The WebSocket half of :class:`~api.passthrough.relay.PassthroughRelay`. Its
    ``__init__`` sets the attributes below."""

    _connect_timeout: float
    _read_timeout: float | None

    async def websocket(self, scope: Scope, receive: Receive, send: Send, upstream: Upstream,
                        on_activity: Callable[[], None] | None = None) -> None:
        """Connect upstream first, then accept the client with the upstream's subprotocol.

        A failed upstream handshake is answered as an HTTP response when the server offers
        the ``websocket.http.response`` ASGI extension (uvicorn does): 502 (refused,
        unreachable), 504 (timed out) with the JSON error body, or the upstream's own
        rejection status and body. Without the extension the handshake is closed with 1011
        before acceptance, which servers answer with 403.
        """
        if (await receive())["type"] != "websocket.connect":
            return  # the client left before its handshake reached us
        activity = _Activity(on_activity)
        activity.tick()
        try:
            conn = await self._ws_connect(scope, upstream)
        except InvalidStatus as exc:  # the upstream's own answer, relayed as is
            reply = exc.response
            headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                       for k, v in reply.headers.raw_items()]
            await _reject_ws(scope, send, reply.status_code, reply.body,
                             _response_headers(headers))
            return
        except TimeoutError:
            await _reject_ws_json(scope, send, 504, TIMED_OUT)
            return
        except (OSError, InvalidHandshake, EOFError):
            await _reject_ws_json(scope, send, 502, NOT_ANSWERING)
            return
        try:
            await send({"type": "websocket.accept", "subprotocol": conn.subprotocol})
            await _relay_ws(conn, receive, send, activity)
        except OSError:
            pass  # the client vanished (uvicorn raises ClientDisconnected, an OSError)
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()

    async def _ws_connect(self, scope: Scope, upstream: Upstream) -> ClientConnection:
        authority = upstream_authority(upstream)
        headers = self._request_headers(scope, authority)
        origin = next((v for n, v in headers if n == b"origin"), None)
        additional = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers
                      if n not in (b"host", b"origin")]
        # Our own connect bounds the connection time; the handshake itself may take
        # longer (Jupyter answers a kernel's WebSocket once the kernel replied).
        sock = await _open_socket(upstream, self._connect_timeout)
        try:
            return await _Connect(
                f"ws://{authority}{_target(scope)}", sock=sock,
                origin=origin.decode("latin-1") if origin else None,  # type: ignore[arg-type]
                subprotocols=scope.get("subprotocols") or None,
                additional_headers=additional, user_agent_header=None, proxy=None,
                compression=None, max_size=None, open_timeout=self._read_timeout,
                close_timeout=5,
            )
        except BaseException:
            sock.close()
            raise


async def _reject_ws(scope: Scope, send: Send, status: int, body: bytes,
                     headers: list[tuple[bytes, bytes]]) -> None:
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1011})
        return
    headers = [(n, v) for n, v in headers if n != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "websocket.http.response.start", "status": status,
                "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})


async def _reject_ws_json(scope: Scope, send: Send, status: int, message: str) -> None:
    body = json.dumps({"success": False, "message": message}).encode()
    await _reject_ws(scope, send, status, body, [(b"content-type", b"application/json")])


def _close_code(code: int | None) -> int:
    """A close code that may be sent on: 1005 (none given) → 1000, 1006 (abnormal) or
    anything reserved → 1011."""
    if code == 1005:
        return 1000
    if code is not None and (code in _SENDABLE_CLOSE or 3000 <= code <= 4999):
        return code
    return 1011


async def _relay_ws(conn: ClientConnection, receive: Receive, send: Send,
                    activity: _Activity) -> None:
    """Both directions at once; whichever side closes first closes the other."""
    to_upstream = asyncio.create_task(_client_to_upstream(conn, receive, activity))
    to_client = asyncio.create_task(_upstream_to_client(conn, send, activity))
    tasks = (to_upstream, to_client)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:  # a gone client (OSError) ends the relay; anything else is a bug
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, OSError):
            raise error
    if not to_upstream.cancelled() and to_upstream.exception() is None:
        client_close = to_upstream.result()
        if client_close is not None:  # the client closed: same code upstream
            await conn.close(_close_code(client_close[0]), client_close[1])
            return
    # The upstream closed (or failed): tell the client why, if it is still there.
    with contextlib.suppress(OSError, RuntimeError):
        await send({"type": "websocket.close", "code": _close_code(conn.close_code),
                    "reason": conn.close_reason or ""})


async def _client_to_upstream(conn: ClientConnection, receive: Receive,
                              activity: _Activity) -> tuple[int, str] | None:
    """Until the client closes (its code and reason) or the upstream does (None)."""
    try:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                await conn.send(text if text is not None else message.get("bytes") or b"")
                activity.tick()
            elif kind == "websocket.disconnect":
                return message.get("code", 1005), message.get("reason") or ""
    except ConnectionClosed:
        return None


async def _upstream_to_client(conn: ClientConnection, send: Send, activity: _Activity) -> None:
    """Until the upstream closes."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            data = await conn.recv()
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
            activity.tick()
