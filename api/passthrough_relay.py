"""The passthrough relay engine: HTTP and WebSocket traffic to an interactive session.

The caller has already decided who may pass and where to: it hands us raw ASGI
``scope/receive/send`` and a trusted :class:`Upstream`. The path and query are relayed
unchanged (sessions serve under their own ``/passthrough/<hostname>/<job_id>/`` base URL).

An upstream is TCP ``host:port`` (a remote compute node) or a Unix socket (a local job). A
socket is opened without following a link and only when it is a socket owned by the
session's owner (:func:`_open_unix`): its name lives in a directory the owner can write, so
the owner could swap it for a link to someone else's session.

HTTP goes through a small pooled HTTP/1.1 client of our own: h11 (the protocol engine httpx
itself uses) on asyncio protocols. An ``httpx.AsyncClient`` was measured first: ~1 ms of CPU
per small relayed request, its pool's bookkeeping growing with the square of open
connections (324 req/s through the relay with 16 clients in ``bench/passthrough.py``); this
client costs ~0.15-0.2 ms whatever the concurrency (~4000 req/s). Both bodies stream chunk by
chunk with flow control both ways (constant memory); the response body is relayed as sent
(gzip passes through untouched, Content-Length stays right). WebSockets use the
``websockets`` client; the client's handshake is answered only once the upstream's succeeded.

Request headers, both protocols:

* dropped: hop-by-hop ones (and those named in ``Connection``), ``Expect`` (the server has
  answered ``100-continue`` already), ``Sec-WebSocket-*`` (the upstream handshake is our
  own), ``X-Real-IP`` and ``X-Scheme`` (Tornado prefers them to ``X-Forwarded-*``, so a
  client could spoof its address), ``strip_request_headers``, and the ``strip_cookies``
  pairs of ``Cookie`` (several ``Cookie`` headers are merged into one);
* ``Host`` becomes the upstream's ``host[:port]`` (port omitted when 80, as the
  ``websockets`` client writes it), ``localhost`` over a Unix socket; ``X-Forwarded-Host``
  the client's ``Host``; ``X-Forwarded-Proto`` ``http``/``https`` from the scope's scheme
  (``ws``/``wss`` mapped); ``scope["client"]`` is appended to ``X-Forwarded-For`` unless
  already its last entry;
* ``Origin`` and ``Referer`` are rewritten to ``http://<upstream host[:port]>``
  (``http://localhost`` over a Unix socket) only when they name the client's ``Host`` (a
  same-origin request): Jupyter compares them with ``Host`` and would otherwise answer
  404/403. Cross-site values pass unchanged, so the session's own cross-origin checks
  still apply.

Response headers pass through except hop-by-hop ones and ``Date``/``Server`` (the ASGI server
adds its own; two ``Date`` headers are invalid). ``Set-Cookie`` headers stay separate,
``Location`` is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_from_bytes, urlsplit

import anyio
import h11
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
POOL_FULL = "Too many requests to sessions at once; try again shortly."
# Host (and same-origin Origin) of requests over a Unix socket: Jupyter compares the two.
UNIX_AUTHORITY = "localhost"

ACTIVITY_INTERVAL_S = 5.0
# Idle upstream connections are closed after this (4-8 s), under uvicorn's 5 s keep-alive
# (Tornado's is an hour), so we hardly ever reuse one the server is closing.
KEEPALIVE_S = 4.0
# A response this small arrives in one read: no need to watch for the client leaving.
_SMALL_BODY = 64 * 1024
# Upstream bytes buffered before we stop reading the socket (a slow client slows the session).
_READ_HIGH_WATER = 256 * 1024
_MAX_RESPONSE_HEAD = 64 * 1024
# A request on a reused connection that the upstream closed before answering is retried
# once on a fresh connection when repeating it is harmless.
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

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
    """Where a session answers: TCP ``host:port``, or the Unix socket ``socket_path`` (then
    ``host``/``port`` are unused; see :meth:`unix`). ``socket_uid``: the socket must be
    owned by that uid (``None``: any owner). Hashable: it keys the connection pool."""

    host: str
    port: int
    socket_path: str | None = None
    socket_uid: int | None = None

    def __post_init__(self) -> None:
        # A relative name would be resolved against our working directory.
        if self.socket_path is not None and not os.path.isabs(self.socket_path):
            raise ValueError(f"socket path must be absolute: {self.socket_path!r}")

    @classmethod
    def unix(cls, path: str, uid: int | None = None) -> Upstream:
        return cls(UNIX_AUTHORITY, 80, socket_path=path, socket_uid=uid)


class UpstreamBrokenError(Exception):
    """The upstream failed after the response had started: the client connection must be
    dropped so the client sees a truncated response. Raised out of :meth:`PassthroughRelay.http`
    (uvicorn closes the connection when the app raises)."""


class _ClientGone(Exception):
    """The client disconnected while its request body was being relayed."""


class _UpstreamClosed(Exception):
    """The upstream closed the connection before sending any byte of a response."""


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
        self._pool: _Pool | None = None

    # --- HTTP ---------------------------------------------------------------------------

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

    # --- lifecycle ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the idle upstream connections; those in use close when their request ends.
        The relay stays usable (a new pool is made on demand)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()


# --- helpers ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def upstream_authority(upstream: Upstream) -> str:
    """``host[:port]`` exactly as the ``websockets`` client writes ``Host``; ``localhost``
    for a Unix socket."""
    if upstream.socket_path is not None:
        return UNIX_AUTHORITY
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


async def _open_socket(upstream: Upstream, timeout: float) -> socket.socket:
    """A connected non-blocking socket to the upstream (TCP or Unix), within ``timeout``
    seconds. The one connector of both the HTTP pool and the WebSocket client."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        if upstream.socket_path is not None:
            return await _open_unix(loop, upstream.socket_path, upstream.socket_uid)
        infos = await loop.getaddrinfo(upstream.host, upstream.port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {upstream.host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames now
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


async def _open_unix(loop: asyncio.AbstractEventLoop, path: str, uid: int | None
                     ) -> socket.socket:
    """Connect to the socket inode ``path`` names now, never through a link.

    ``O_PATH | O_NOFOLLOW`` pins the final name without following it (a link is opened as
    the link itself, and fails the socket check); connecting to ``/proc/self/fd/N`` then
    reaches that very inode, so a rename between the check and the connect changes nothing.
    A wrong type or owner is an ``OSError``: to the client, a session not answering."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} is not a socket")
        if uid is not None and st.st_uid != uid:
            raise OSError(f"{path} is owned by uid {st.st_uid}, not {uid}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # no TCP_NODELAY on AF_UNIX
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, f"/proc/self/fd/{fd}")
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)


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


# --- the upstream HTTP/1.1 client ---------------------------------------------------------

class _Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream: h11 parses, asyncio moves the bytes.

    The event loop watches idle connections for us: one the upstream closed is marked at
    once and never reused (no per-request socket probing)."""

    def __init__(self, pool: _Pool, upstream: Upstream) -> None:
        self.upstream = upstream
        self.idle_since = 0.0
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE_HEAD)
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._answered = False  # a byte of the current response arrived

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> None:
        self._eof = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._closed = True
        self._wake()
        self._pool.forget(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    # used by the relay

    def reusable(self, now: float) -> bool:
        return (not self._eof and not self._chunks and now - self.idle_since < KEEPALIVE_S
                and self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE)

    def finish_cycle(self) -> bool:
        """Ready the connection for its next request, if both sides ended cleanly."""
        if (self._eof or self.h11.our_state is not h11.DONE
                or self.h11.their_state is not h11.DONE):
            return False
        self.h11.start_next_cycle()
        return True

    def close(self) -> None:
        self._eof = self._closed = True
        if self._transport is not None:
            self._transport.close()

    async def send_request(self, request: h11.Request, body: AsyncIterator[bytes] | None,
                           timeout: float | None) -> h11.Response:
        """Send the request (streaming ``body``) and read the response head."""
        self._answered = False
        try:
            if body is None:  # one write, one packet
                await self._write(self.h11.send(request) + self.h11.send(h11.EndOfMessage()),
                                  timeout)
            else:
                await self._write(self.h11.send(request), timeout)
                async for chunk in body:
                    await self._write(self.h11.send(h11.Data(data=chunk)), timeout)
                await self._write(self.h11.send(h11.EndOfMessage()), timeout)
        except ConnectionError:
            pass  # the upstream may have answered early, then closed: read what it said
        while True:
            event = await self.next_event(timeout)
            if type(event) is h11.Response:
                return event
            if type(event) is not h11.InformationalResponse:  # 1xx are skipped
                raise h11.RemoteProtocolError(f"unexpected {event!r}")

    async def next_event(self, timeout: float | None) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self._read(timeout))

    async def _read(self, timeout: float | None) -> bytes:
        """What arrived (waiting up to ``timeout``); b"" once the upstream closed."""
        while not self._chunks and not self._eof:  # also woken by resume_writing()
            await self._wait(timeout)
        if not self._chunks:
            if not self._answered:
                raise _UpstreamClosed("the session closed the connection without answering")
            return b""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._answered = True
        if self._reading_paused and not self._closed:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return data

    async def _write(self, data: bytes, timeout: float | None) -> None:
        if self._closed or self._transport is None:
            raise ConnectionResetError("the session closed the connection")
        self._transport.write(data)
        while self._writing_paused and not self._closed:
            await self._wait(timeout)
        if self._closed:
            raise ConnectionResetError("the session closed the connection")

    async def _wait(self, timeout: float | None) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Pool:
    """Keep-alive connections per upstream, newest reused first.

    ``slots`` bounds the requests in flight (``max_connections``); as many idle connections
    may be kept, each for :data:`KEEPALIVE_S` at most."""

    def __init__(self, max_connections: int, connect_timeout: float) -> None:
        self.slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_connections
        self._connect_timeout = connect_timeout
        self._idle: dict[Upstream, list[_Connection]] = {}
        self._idle_count = 0
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._closed = False

    async def acquire_slot(self) -> bool:
        """A slot for one request, waiting up to the connect timeout; False if none."""
        if not self.slots.locked():
            await self.slots.acquire()  # returns at once: no timer to arm
            return True
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.slots.acquire()
        except TimeoutError:
            return False
        return True

    async def checkout(self, upstream: Upstream) -> tuple[_Connection, bool]:
        """A connection to ``upstream`` and whether it was reused."""
        idle = self._idle.get(upstream)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if conn.reusable(now):
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            sock = await _open_socket(upstream, self._connect_timeout)
            try:
                _, conn = await loop.create_connection(lambda: _Connection(self, upstream),
                                                       sock=sock)
            except BaseException:
                sock.close()
                raise
        return conn, False

    def release(self, conn: _Connection, reusable: bool) -> None:
        if (not reusable or self._closed or self._idle_count >= self._max_idle
                or not conn.finish_cycle()):
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.upstream, []).append(conn)
        self._idle_count += 1
        if self._sweep_timer is None:
            self._sweep_timer = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._sweep)

    def forget(self, conn: _Connection) -> None:
        """A connection was lost: out of the idle lists if it was there."""
        idle = self._idle.get(conn.upstream)
        if idle and conn in idle:
            idle.remove(conn)
            self._idle_count -= 1
            if not idle:
                del self._idle[conn.upstream]

    def close(self) -> None:
        self._closed = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        self._idle.clear()
        self._idle_count = 0

    def _sweep(self) -> None:
        """Close connections idle too long, so sessions nobody uses hold no sockets."""
        self._sweep_timer = None
        now = time.monotonic()
        for upstream, idle in list(self._idle.items()):
            expired = [c for c in idle if now - c.idle_since >= KEEPALIVE_S]
            for conn in expired:
                idle.remove(conn)
                self._idle_count -= 1
                conn.close()
            if not idle:
                del self._idle[upstream]
        if self._idle_count and not self._closed:
            self._sweep_timer = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._sweep)
