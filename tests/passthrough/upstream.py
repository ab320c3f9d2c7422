"""What the passthrough tests share: a small upstream and the relay's app, for real servers
on loopback.

:func:`upstream_app` is the upstream (HTTP echo, streams, cookies, redirect, errors, a slow
and a broken endpoint, a WebSocket echo); :func:`relay_app` routes by the hostname segment of
``/passthrough/<hostname>/<job_id>/...`` to a fixed :class:`Upstream`; :func:`serve` runs
either on uvicorn. Also a raw upstream that drops reused connections, and Unix decoy sockets
that count the connections they accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from api.passthrough import PassthroughRelay, Upstream

HOST = "127.0.0.1"
BASE = "/passthrough/h/1/"
MIB = 1024 * 1024
BLOCK = secrets.token_bytes(64 * 1024)
KERNEL_PROTOCOL = "v1.kernel.websocket.jupyter.org"

Scope = dict[str, Any]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def serve(app: Callable[..., Any], **config: Any) -> AsyncIterator[int]:
    """``app`` on a real uvicorn in this event loop; its port (0 when ``uds=`` is given)."""
    port = 0 if "uds" in config else free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="critical",
                                           lifespan="off", access_log=False, **config))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


# --- the upstream ---------------------------------------------------------------------

@dataclass
class UpstreamState:
    """What the upstream saw, for assertions."""

    endless_gone: asyncio.Event = field(default_factory=asyncio.Event)
    ws_headers: list[dict[str, Any]] = field(default_factory=list)
    ws_disconnects: list[int] = field(default_factory=list)
    ws_disconnected: asyncio.Event = field(default_factory=asyncio.Event)


STATE = UpstreamState()


async def start(send: Callable[..., Any], status: int, headers: list[tuple[bytes, bytes]]
                ) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def reply(send: Callable[..., Any], status: int, body: bytes,
                content_type: bytes = b"text/plain", extra: tuple = ()) -> None:
    await start(send, status, [(b"content-type", content_type),
                               (b"content-length", str(len(body)).encode()), *extra])
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Callable[..., Any]) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def stream(send: Callable[..., Any], size: int) -> None:
    """``size`` bytes from one reused block: the upstream itself stays small."""
    sent = 0
    while sent < size:
        block = BLOCK[: min(len(BLOCK), size - sent)]
        await send({"type": "http.response.body", "body": block, "more_body": True})
        sent += len(block)
    await send({"type": "http.response.body", "body": b""})


async def upstream_http(scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]
                        ) -> None:
    name = scope["path"].split("/", 4)[4]  # after /passthrough/<hostname>/<job_id>/
    query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
    if name.startswith("echo"):
        body = await read_body(receive)
        client = scope["client"] or (None, None)  # None over a Unix socket
        await reply(send, 200, json.dumps({
            "method": scope["method"], "path": scope["path"],
            "raw_path": scope["raw_path"].decode(), "query": scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
            "body": body.decode(), "client_port": client[1],
        }).encode(), b"application/json")
    elif name == "big":
        size = int(query["size"])
        await start(send, 200, [(b"content-type", b"application/octet-stream"),
                                (b"content-length", str(size).encode())])
        await stream(send, size)
    elif name == "upload":
        digest, count = hashlib.sha256(), 0
        while True:
            message = await receive()
            digest.update(message.get("body", b""))
            count += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await reply(send, 200, json.dumps({"bytes": count, "sha256": digest.hexdigest()}
                                          ).encode(), b"application/json")
    elif name == "chunked":  # no Content-Length: uvicorn sends it chunked
        await start(send, 200, [(b"content-type", b"text/plain")])
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif name == "nocontent":
        await start(send, 204, [])
        await send({"type": "http.response.body", "body": b""})
    elif name == "reject-upload":  # answers before reading the body
        await reply(send, 413, b"too big")
    elif name == "cookies":
        await reply(send, 200, b"ok", extra=((b"set-cookie", b"one=1; Path=/"),
                                             (b"set-cookie", b"two=2; Path=/; HttpOnly")))
    elif name == "redirect":
        await reply(send, 302, b"", extra=((b"location", f"{BASE}lab?x=1".encode()),))
    elif name == "error":
        await reply(send, 500, b"boom")
    elif name == "slow":
        await asyncio.sleep(3)
        await reply(send, 200, b"late")
    elif name == "broken":
        # Promise 1 MiB (or chunked), send 128 KiB, then fail: uvicorn drops the connection.
        headers = [(b"content-length", str(MIB).encode())] if "chunked" not in query else []
        await start(send, 200, headers)
        await send({"type": "http.response.body", "body": BLOCK * 2, "more_body": True})
        raise RuntimeError("upstream breaks mid-body (expected in this test)")
    elif name == "endless":
        await endless(receive, send)
    else:
        await reply(send, 404, b"no such thing")


async def endless(receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """Streams until the relay drops the connection; records that it did."""
    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        STATE.endless_gone.set()

    watcher = asyncio.create_task(watch())
    await start(send, 200, [(b"content-type", b"application/octet-stream")])
    while not STATE.endless_gone.is_set():
        await send({"type": "http.response.body", "body": BLOCK, "more_body": True})
        await asyncio.sleep(0.001)
    await watcher


async def upstream_ws(scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]
                      ) -> None:
    await receive()  # websocket.connect
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    STATE.ws_headers.append(headers)
    if scope["path"].endswith("/reject"):
        await send({"type": "websocket.close", "code": 1008})  # uvicorn answers 403
        return
    offered = scope.get("subprotocols", [])
    chosen = next((p for p in offered if p in (KERNEL_PROTOCOL, "other")), None)
    await send({"type": "websocket.accept", "subprotocol": chosen})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            STATE.ws_disconnects.append(message["code"])
            STATE.ws_disconnected.set()
            return
        if message.get("text") == "close-me":
            await send({"type": "websocket.close", "code": 4321, "reason": "asked to"})
            return
        if message.get("text") == "headers?":
            await send({"type": "websocket.send", "text": json.dumps(headers)})
        elif message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


async def upstream_app(scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]
                       ) -> None:
    if scope["type"] == "http":
        await upstream_http(scope, receive, send)
    elif scope["type"] == "websocket":
        await upstream_ws(scope, receive, send)


async def flaky_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers the first request of each connection, then closes on the next one without
    answering: what a reused keep-alive connection looks like when the server dropped it."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


# --- the relay ------------------------------------------------------------------------

@dataclass
class Env:
    relay_url: str
    relay_port: int
    upstream_port: int
    routes: dict[str, tuple[PassthroughRelay, Upstream]]
    activity: list[float]

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.relay_port}"


def relay_app(routes: dict[str, tuple[PassthroughRelay, Upstream]], activity: list[float]
              ) -> Callable[..., Any]:
    """Everything to ``relay.http``/``relay.websocket``, the upstream chosen by hostname."""
    def on_activity() -> None:
        activity.append(time.monotonic())

    async def app(scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        hostname = scope["path"].split("/")[2]
        relay, upstream = routes[hostname]
        if hostname == "noext":  # a server without the websocket.http.response extension
            scope = {**scope, "extensions": {}}
        if scope["type"] == "http":
            await relay.http(scope, receive, send, upstream, on_activity)
        elif scope["type"] == "websocket":
            await relay.websocket(scope, receive, send, upstream, on_activity)

    return app


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k == name]


# --- Unix socket upstreams --------------------------------------------------------------

@dataclass
class Decoy:
    """A Unix socket answering ``HTTP 200 decoy``, counting the connections it accepted."""

    path: str
    server: asyncio.AbstractServer
    connections: int = 0


async def start_decoy(path: str) -> Decoy:
    decoy: Decoy

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoy.connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n"
                         b"\r\ndecoy")
            await writer.drain()
        writer.close()

    decoy = Decoy(path, await asyncio.start_unix_server(answer, path))
    return decoy


@dataclass
class UnixEnv:
    path: str  # the upstream app on a Unix socket
    decoy: Decoy  # ours, reached directly only
    foreign: Decoy  # chowned to 65534 when we are root

