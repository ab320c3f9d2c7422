"""The passthrough relay engine: HTTP and WebSocket traffic to an interactive session.

The caller has already decided who may pass and where to: it hands us raw ASGI
``scope/receive/send`` and a trusted :class:`Upstream`. The path and query are relayed
unchanged (sessions serve under their own ``/passthrough/<hostname>/<job_id>/`` base URL).

HTTP goes through one pooled ``httpx.AsyncClient``; both bodies are streamed chunk by chunk
(constant memory), the response body raw (gzip passes through untouched). WebSockets use the
``websockets`` client; the client's handshake is answered only once the upstream's succeeded.

Request headers, both protocols:

* dropped: hop-by-hop ones (and those named in ``Connection``), ``Expect`` (the server has
  answered ``100-continue`` already), ``Sec-WebSocket-*`` (the upstream handshake is our
  own), ``X-Real-IP`` and ``X-Scheme`` (Tornado prefers them to ``X-Forwarded-*``, so a
  client could spoof its address), ``strip_request_headers``, and the ``strip_cookies``
  pairs of ``Cookie`` (several ``Cookie`` headers are merged into one);
* ``Host`` becomes the upstream's ``host[:port]`` (port omitted when 80, as the
  ``websockets`` client writes it); ``X-Forwarded-Host`` the client's ``Host``;
  ``X-Forwarded-Proto`` ``http``/``https`` from the scope's scheme (``ws``/``wss`` mapped);
  ``scope["client"]`` is appended to ``X-Forwarded-For`` unless already its last entry;
* ``Origin`` and ``Referer`` are rewritten to ``http://<upstream host[:port]>`` only when
  they name the client's ``Host`` (a same-origin request): Jupyter compares them with
  ``Host`` and would otherwise answer 404/403. Cross-site values pass unchanged, so the
  session's own cross-origin checks still apply.

Response headers pass through except hop-by-hop ones and ``Date``/``Server`` (the ASGI server
adds its own; two ``Date`` headers are invalid). ``Set-Cookie`` headers stay separate,
``Location`` is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from http.cookiejar import CookieJar
from typing import Any
from urllib.parse import quote, quote_from_bytes, urlsplit

import anyio
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.headers import build_host

__all__ = ["PassthroughRelay", "Upstream", "UpstreamBrokenError"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NOT_ANSWERING = "The session is not answering. It may still be starting, or it has stopped."
TIMED_OUT = "The session did not answer in time."
POOL_FULL = "Too many open connections to sessions; try again shortly."

ACTIVITY_INTERVAL_S = 5.0
# A response this small arrives in one read: no need to watch for the client leaving.
_SMALL_BODY = 64 * 1024

_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
# Request headers we never forward; see the module docstring for why.
_REQUEST_DROP = _HOP_BY_HOP | {
    b"expect", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"sec-websocket-accept", b"x-real-ip", b"x-scheme",
    b"x-forwarded-host", b"x-forwarded-proto",
}
_RESPONSE_DROP = _HOP_BY_HOP | {b"date", b"server"}
# Close codes an endpoint may send (RFC 6455 7.4); 1004-1006 and 1015 are reserved.
_SENDABLE_CLOSE = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})
# Printable ASCII stays as is in a re-quoted raw path; only other bytes are escaped.
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int


class UpstreamBrokenError(Exception):
    """The upstream failed after the response had started: the client connection must be
    dropped so the client sees a truncated response. Raised out of :meth:`PassthroughRelay.http`
    (uvicorn closes the connection when the app raises)."""


class _ClientGone(Exception):
    """The client disconnected while its request body was being relayed."""


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


class _Connect(connect):
    """The ``websockets`` client, minus its redirect following: the client gets the 3xx."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


class _NoCookies(CookieJar):
    """httpx stores every response's cookies in its client's jar: one jar shared by all
    users would grow without bound and mix their sessions; we forward Set-Cookie instead."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


class PassthroughRelay:
    """Relays one HTTP request or WebSocket per call to an already-authorised upstream."""

    def __init__(self, *, connect_timeout: float = 10.0, read_timeout: float | None = 300.0,
                 max_connections: int = 200, strip_request_headers: Iterable[str] = (),
                 strip_cookies: Iterable[str] = ()) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._drop = _REQUEST_DROP | {h.lower().encode("latin-1") for h in strip_request_headers}
        self._strip_cookies = frozenset(strip_cookies)
        self._timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout,
                                      write=read_timeout, pool=connect_timeout)
        # A Request built by hand carries no client timeouts: pass them per request.
        self._extensions = {"timeout": self._timeout.as_dict()}
        self._client: httpx.AsyncClient | None = None

    # --- HTTP ---------------------------------------------------------------------------

    async def http(self, scope: Scope, receive: Receive, send: Send, upstream: Upstream,
                   on_activity: Callable[[], None] | None = None) -> None:
        activity = _Activity(on_activity)
        activity.tick()
        request = self._build_request(scope, receive, upstream)
        try:
            response = await self._http_client().send(request, stream=True)
        except _ClientGone:
            return  # nobody left to answer
        except httpx.PoolTimeout:
            await _send_json_error(send, 503, POOL_FULL)
            return
        except httpx.TimeoutException:
            await _send_json_error(send, 504, TIMED_OUT)
            return
        except httpx.TransportError:
            await _send_json_error(send, 502, NOT_ANSWERING)
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": _response_headers(response.headers.raw)})
            await self._relay_body(response, receive, send, activity)
        finally:
            await response.aclose()  # an unfinished response closes its connection

    def _build_request(self, scope: Scope, receive: Receive, upstream: Upstream
                       ) -> httpx.Request:
        authority = upstream_authority(upstream)
        headers = self._request_headers(scope, authority)
        has_body = any(name == b"transfer-encoding" or (name == b"content-length"
                                                         and value.strip() != b"0")
                       for name, value in scope["headers"])
        # Built by hand, not client.build_request(): that would add httpx's default
        # headers (Accept-Encoding: gzip would reach the session for clients that never
        # asked for it, and the raw gzip body would come back to them).
        return httpx.Request(
            scope["method"], f"http://{authority}{_target(scope)}", headers=headers,
            content=_request_body(receive) if has_body else None,
            extensions=self._extensions,
        )

    def _http_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                http1=True, http2=False, follow_redirects=False, trust_env=False,
                timeout=self._timeout, cookies=_NoCookies(),
                limits=httpx.Limits(max_connections=self._max_connections,
                                    max_keepalive_connections=self._max_connections),
            )
        return self._client

    async def _relay_body(self, response: httpx.Response, receive: Receive, send: Send,
                          activity: _Activity) -> None:
        # uvicorn's send() ignores a gone client, so a watcher on receive() tells us to stop
        # reading the upstream; small bodies skip it (one read, no task to start).
        watcher: asyncio.Task[None] | None = None
        with anyio.CancelScope() as scope:
            try:
                if not _known_small(response):
                    watcher = asyncio.create_task(_cancel_on_disconnect(receive, scope))
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                    activity.tick()
            except (httpx.TransportError, httpx.StreamError) as exc:
                raise UpstreamBrokenError(f"the session broke off its response: {exc!r}"
                                          ) from exc
            finally:
                if watcher is not None:
                    watcher.cancel()
        if not scope.cancelled_caught:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _request_headers(self, scope: Scope, authority: str) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        drop = self._drop
        for name, value in raw:
            if name == b"connection":  # headers it names are hop-by-hop too
                drop = drop | {t.strip().lower() for t in value.split(b",")}
        out: list[tuple[bytes, bytes]] = []
        host = b""
        cookies: list[bytes] = []
        forwarded_for: list[bytes] = []
        same_origin: list[tuple[bytes, bytes]] = []
        for name, value in raw:
            if name in drop:
                continue
            if name == b"host":
                host = value
            elif name == b"cookie":
                cookies.append(value)
            elif name == b"x-forwarded-for":
                forwarded_for.append(value)
            elif name in (b"origin", b"referer"):
                same_origin.append((name, value))
            else:
                out.append((name, value))
        out.append((b"host", authority.encode("latin-1")))
        if host:
            out.append((b"x-forwarded-host", host))
        out.append((b"x-forwarded-proto", _forwarded_proto(scope)))
        if forwarded_for or scope.get("client"):
            out.append((b"x-forwarded-for", _forwarded_for(forwarded_for, scope)))
        cookie = self._filter_cookies(cookies)
        if cookie:
            out.append((b"cookie", cookie))
        for name, value in same_origin:
            out.append((name, _rewrite_origin(value, host, authority)))
        return out

    def _filter_cookies(self, headers: list[bytes]) -> bytes:
        if not self._strip_cookies:
            return b"; ".join(headers)
        kept = []
        for header in headers:
            for pair in header.split(b";"):
                pair = pair.strip()
                name = pair.split(b"=", 1)[0].strip().decode("latin-1")
                if pair and name not in self._strip_cookies:
                    kept.append(pair)
        return b"; ".join(kept)

    # --- WebSocket ----------------------------------------------------------------------

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
        # Our own TCP connect bounds the connection time; the handshake itself may take
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

    # --- lifecycle ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the pooled upstream connections (relays in progress fail)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


# --- helpers ------------------------------------------------------------------------------

def upstream_authority(upstream: Upstream) -> str:
    """``host[:port]`` exactly as the ``websockets`` client writes ``Host``."""
    return build_host(upstream.host, upstream.port, secure=False)


def _target(scope: Scope) -> str:
    """Path and query as the client sent them, ready for a URL."""
    raw = scope.get("raw_path")
    if raw:
        path = _ascii(raw)
    else:
        path = quote(scope["path"], safe="/!$&'()*+,;=:@~%")
    query: bytes = scope.get("query_string", b"")
    if not query:
        return path
    return f"{path}?{_ascii(query)}"


def _ascii(raw: bytes) -> str:
    """Raw URL bytes as text, any non-ASCII byte percent-encoded (browsers do it anyway)."""
    return raw.decode("ascii") if raw.isascii() else quote_from_bytes(raw, _PATH_SAFE)


def _forwarded_proto(scope: Scope) -> bytes:
    return b"https" if scope.get("scheme") in ("https", "wss") else b"http"


def _forwarded_for(values: list[bytes], scope: Scope) -> bytes:
    """The incoming chain plus the client. Behind a trusted proxy uvicorn already took the
    client from that chain (``proxy_headers``): it is not appended twice."""
    chain = b", ".join(values)
    client = scope.get("client")
    if not client:
        return chain
    address = str(client[0]).encode("latin-1")
    if not chain:
        return address
    if chain.rsplit(b",", 1)[-1].strip() == address:
        return chain
    return chain + b", " + address


def _rewrite_origin(value: bytes, host: bytes, authority: str) -> bytes:
    """Point a same-origin ``Origin``/``Referer`` at the upstream (see module docstring)."""
    try:
        parts = urlsplit(value.decode("latin-1"))
    except ValueError:
        return value
    if not host or parts.netloc.lower().encode("latin-1") != host.lower():
        return value
    return parts._replace(scheme="http", netloc=authority).geturl().encode("latin-1")


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


def _response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = _RESPONSE_DROP
    for name, value in raw:
        if name.lower() == b"connection":
            drop = drop | {t.strip().lower() for t in value.split(b",")}
    return [(name.lower(), value) for name, value in raw if name.lower() not in drop]


def _known_small(response: httpx.Response) -> bool:
    length = response.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) <= _SMALL_BODY


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    # Any request body left unread (an upstream that answered early) is discarded here.
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _send_json_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"success": False, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _open_socket(upstream: Upstream, timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket to the upstream, within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        infos = await loop.getaddrinfo(upstream.host, upstream.port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {upstream.host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error


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
    if to_upstream.done() and not to_upstream.cancelled() and to_upstream.exception() is None:
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
