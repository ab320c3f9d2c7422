"""PassthroughRelay against real servers on loopback, no mocks.

One uvicorn serves a small upstream (HTTP echo, streams, cookies, redirect, errors, a slow
and a broken endpoint, a WebSocket echo); another serves the relay, routing by the hostname
segment of ``/passthrough/<hostname>/<job_id>/...`` to a fixed :class:`Upstream`. Clients are
``httpx`` and ``websockets``. The same upstream also listens on a Unix socket, next to
decoy sockets that count connections (reached through a link, or owned by someone else,
they must never be). The last test runs a real JupyterLab when it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from api.passthrough import NOT_ANSWERING, PassthroughRelay, Upstream, http_pool
from api.passthrough.upstream import upstream_authority

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


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[Env]:
    relay = PassthroughRelay(strip_request_headers=["UWS-Authorization"],
                             strip_cookies=["uws_session"], read_timeout=30)
    impatient = PassthroughRelay(read_timeout=1.0)
    single = PassthroughRelay(max_connections=1, connect_timeout=0.5)
    refused = Upstream(HOST, free_port())  # nothing listens there
    flaky = await asyncio.start_server(flaky_upstream, HOST, 0)
    activity: list[float] = []
    # The upstream sees the relay's own address (not X-Forwarded-For): connection reuse shows.
    async with serve(upstream_app, proxy_headers=False) as upstream_port:
        upstream = Upstream(HOST, upstream_port)
        routes = {"h": (relay, upstream), "slow": (impatient, upstream),
                  "single": (single, upstream), "refused": (relay, refused),
                  "noext": (relay, refused),
                  "flaky": (relay, Upstream(HOST, flaky.sockets[0].getsockname()[1]))}
        async with serve(relay_app(routes, activity)) as relay_port:
            yield Env(f"http://{HOST}:{relay_port}", relay_port, upstream_port, routes,
                      activity)
    flaky.close()
    for each in (relay, impatient, single):
        await each.aclose()


@pytest.fixture
async def client(env: Env) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=env.relay_url, timeout=60) as c:
        yield c


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k == name]


# --- HTTP -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_method_path_query_and_body_pass_through(client: httpx.AsyncClient,
                                                      method: str) -> None:
    body = b"" if method in ("GET", "OPTIONS") else f"payload of {method}".encode()
    r = await client.request(method, f"{BASE}echo/a%20b/c%2Fd;x", params={"q": "1/2", "r": ""},
                             content=body)
    assert r.status_code == 200, r.text
    echo = r.json()
    assert echo["method"] == method
    assert echo["raw_path"] == f"{BASE}echo/a%20b/c%2Fd;x"
    assert echo["query"] == "q=1%2F2&r="
    assert echo["body"] == body.decode()


async def test_chunked_request_body(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"one ", b"two ", b"three"):
            yield part

    r = await client.post(f"{BASE}echo", content=chunks())
    assert r.json()["body"] == "one two three"


async def test_request_headers_rewritten(env: Env, client: httpx.AsyncClient) -> None:
    relay_host = f"{HOST}:{env.relay_port}"
    r = await client.get(f"{BASE}echo", headers={
        "UWS-Authorization": "Token secret",
        "Cookie": "a=1; uws_session=secret; b=2",
        "X-Custom": "kept",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "named in Connection",
        "Keep-Alive": "timeout=5",
        "X-Forwarded-For": "10.0.0.1",
        "X-Real-IP": "6.6.6.6",
        "X-Forwarded-Host": "spoofed.example",
        "Origin": f"http://{relay_host}",
        "Referer": f"http://{relay_host}{BASE}lab?x=1",
    })
    echo = r.json()
    names = {k for k, _ in echo["headers"]}
    assert not names & {"uws-authorization", "x-hop", "keep-alive", "x-real-ip"}
    assert header_values(echo, "cookie") == ["a=1; b=2"]
    assert header_values(echo, "x-custom") == ["kept"]
    upstream_host = f"{HOST}:{env.upstream_port}"
    assert header_values(echo, "host") == [upstream_host]
    assert header_values(echo, "x-forwarded-host") == [relay_host]
    assert header_values(echo, "x-forwarded-proto") == ["http"]
    # uvicorn trusts loopback proxies: scope["client"] is 10.0.0.1 already, not repeated.
    assert header_values(echo, "x-forwarded-for") == ["10.0.0.1"]
    # Same-origin Origin/Referer follow Host (Jupyter compares them).
    assert header_values(echo, "origin") == [f"http://{upstream_host}"]
    assert header_values(echo, "referer") == [f"http://{upstream_host}{BASE}lab?x=1"]
    # Every request header is passed as is, not the httpx client's defaults.
    assert header_values(echo, "accept-encoding") == ["gzip, deflate"]  # our client's own
    assert "python-httpx" in header_values(echo, "user-agent")[0]


async def test_cross_origin_and_only_stripped_cookie(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{BASE}echo", headers={"Cookie": "uws_session=secret",
                                                 "Origin": "https://evil.example",
                                                 "Accept-Encoding": "identity"})
    echo = r.json()
    assert header_values(echo, "cookie") == []
    assert header_values(echo, "origin") == ["https://evil.example"]  # Jupyter refuses it
    assert header_values(echo, "accept-encoding") == ["identity"]
    assert header_values(echo, "x-forwarded-for") == ["127.0.0.1"]


async def test_set_cookies_kept_separate(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{BASE}cookies")
    assert r.headers.get_list("set-cookie") == ["one=1; Path=/", "two=2; Path=/; HttpOnly"]
    assert len(r.headers.get_list("date")) == 1  # the relay's server adds its own


async def test_redirect_not_followed(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{BASE}redirect")
    assert r.status_code == 302
    assert r.headers["location"] == f"{BASE}lab?x=1"


async def test_server_error_passes_through(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{BASE}error")
    assert (r.status_code, r.text) == (500, "boom")


async def test_not_found_passes_through_for_head(client: httpx.AsyncClient) -> None:
    r = await client.head(f"{BASE}missing")
    assert r.status_code == 404
    assert r.headers["content-length"] == str(len(b"no such thing"))


async def test_chunked_and_empty_responses(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{BASE}chunked")
    assert (r.status_code, r.text) == (200, "one two three")
    assert r.headers["transfer-encoding"] == "chunked"
    r = await client.get(f"{BASE}nocontent")
    assert (r.status_code, r.content) == (204, b"")
    r = await client.head(f"{BASE}big", params={"size": 10 * MIB})  # no body despite the length
    assert (r.status_code, r.headers["content-length"]) == (200, str(10 * MIB))
    assert (await client.get(f"{BASE}echo")).status_code == 200  # the connection still works


async def test_upstream_connections_reused_then_closed_when_idle(
        env: Env, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_pool, "KEEPALIVE_S", 0.3)
    relay = PassthroughRelay()
    env.routes["fresh"] = (relay, Upstream(HOST, env.upstream_port))
    url = "/passthrough/fresh/1/echo"
    ports = {(await client.get(url)).json()["client_port"] for _ in range(5)}
    assert len(ports) == 1  # one keep-alive connection served them all
    await asyncio.sleep(0.8)  # the sweep runs every KEEPALIVE_S
    assert relay._pool is not None and relay._pool._idle_count == 0
    assert (await client.get(url)).json()["client_port"] not in ports
    await relay.aclose()


async def test_answer_before_upload_ends(client: httpx.AsyncClient) -> None:
    r = await client.post(f"{BASE}reject-upload", content=BLOCK * 80)  # 5 MiB
    assert (r.status_code, r.text) == (413, "too big")
    assert (await client.get(f"{BASE}echo")).status_code == 200


async def test_dropped_keepalive_connection_retried_when_harmless(
        client: httpx.AsyncClient) -> None:
    assert (await client.get("/passthrough/flaky/1/a")).text == "ok"
    # The next request reuses that connection, which the server closes without answering:
    # a GET is sent again on a new connection, a POST is not (it may have had effects).
    assert (await client.get("/passthrough/flaky/1/b")).text == "ok"
    r = await client.post("/passthrough/flaky/1/c", content=b"x")
    assert r.status_code == 502


async def test_too_many_requests_in_flight_is_503(client: httpx.AsyncClient) -> None:
    slow = asyncio.create_task(client.get("/passthrough/single/1/slow"))
    await asyncio.sleep(0.3)
    r = await client.get("/passthrough/single/1/echo")
    assert r.status_code == 503
    assert r.json()["success"] is False
    assert (await slow).text == "late"
    assert (await client.get("/passthrough/single/1/echo")).status_code == 200


async def test_refused_upstream_is_502(client: httpx.AsyncClient) -> None:
    r = await client.get("/passthrough/refused/1/anything")
    assert r.status_code == 502
    assert r.json() == {"success": False, "message": NOT_ANSWERING}


async def test_slow_upstream_is_504(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    r = await client.get("/passthrough/slow/1/slow")
    assert r.status_code == 504
    assert r.json()["success"] is False
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_upstream_breaking_mid_body_truncates(client: httpx.AsyncClient,
                                                    framing: str) -> None:
    with pytest.raises(httpx.TransportError):
        async with client.stream("GET", f"{BASE}broken", params={framing: "1"}) as r:
            assert r.status_code == 200
            async for _ in r.aiter_raw():
                pass
    r = await client.get(f"{BASE}echo")  # the relay stays healthy
    assert r.status_code == 200


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def test_download_100_mib_in_bounded_memory(env: Env, client: httpx.AsyncClient) -> None:
    size = 100 * MIB
    await client.get(f"{BASE}big", params={"size": 4 * MIB})  # warm up every buffer once
    before, peak, received = rss_bytes(), 0, 0
    calls_before = len(env.activity)
    async with client.stream("GET", f"{BASE}big", params={"size": size}) as r:
        assert r.headers["content-length"] == str(size)
        async for chunk in r.aiter_raw():
            received += len(chunk)
            if received % (4 * MIB) < len(chunk):
                peak = max(peak, rss_bytes())
    assert received == size
    assert peak - before < 50 * MIB, f"RSS grew by {(peak - before) / MIB:.1f} MiB"
    # One call at the start, then at most one per 5 s of streaming.
    assert 1 <= len(env.activity) - calls_before <= 3


async def test_upload_50_mib_streamed(client: httpx.AsyncClient) -> None:
    size, digest = 50 * MIB, hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(BLOCK)):
            digest.update(BLOCK)
            yield BLOCK

    r = await client.put(f"{BASE}upload", content=body(),
                         headers={"Content-Length": str(size)})
    assert r.json() == {"bytes": size, "sha256": digest.hexdigest()}


async def test_client_leaving_mid_download_releases_upstream(client: httpx.AsyncClient) -> None:
    STATE.endless_gone.clear()
    async with client.stream("GET", f"{BASE}endless") as r:
        received = 0
        async for chunk in r.aiter_raw():
            received += len(chunk)
            if received > 2 * MIB:
                break  # leaving the block closes this connection
    await asyncio.wait_for(STATE.endless_gone.wait(), timeout=5)


async def test_on_activity_called_per_request(env: Env, client: httpx.AsyncClient) -> None:
    before = len(env.activity)
    await client.get(f"{BASE}echo")
    await client.get(f"{BASE}echo")
    assert len(env.activity) - before == 2


# --- WebSocket ------------------------------------------------------------------------

async def test_websocket_echo_and_subprotocol(env: Env) -> None:
    before = len(env.activity)
    async with connect(f"{env.ws_url}{BASE}ws?x=1", subprotocols=[KERNEL_PROTOCOL, "other"],
                       origin=f"http://{HOST}:{env.relay_port}",  # type: ignore[arg-type]
                       max_size=None,
                       additional_headers={"Cookie": "a=1; uws_session=s",
                                           "UWS-Authorization": "Token t"}) as ws:
        assert ws.subprotocol == KERNEL_PROTOCOL
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01binary")
        assert await ws.recv() == b"\x00\x01binary"
        big = secrets.token_bytes(3 * MIB)  # above the websockets default max_size
        await ws.send(big)
        assert await ws.recv() == big
        await ws.send("headers?")
        headers = json.loads(await ws.recv())
    assert headers["cookie"] == "a=1"
    assert "uws-authorization" not in headers
    assert headers["host"] == f"{HOST}:{env.upstream_port}"
    assert headers["origin"] == f"http://{HOST}:{env.upstream_port}"
    assert headers["x-forwarded-host"] == f"{HOST}:{env.relay_port}"
    assert headers["sec-websocket-protocol"] == f"{KERNEL_PROTOCOL}, other"
    assert len(env.activity) > before


async def test_websocket_upstream_close_code_reaches_client(env: Env) -> None:
    async with connect(f"{env.ws_url}{BASE}ws") as ws:
        assert ws.subprotocol is None
        await ws.send("close-me")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4321
    assert ws.close_reason == "asked to"


async def test_websocket_client_close_reaches_upstream(env: Env) -> None:
    STATE.ws_disconnected.clear()
    ws = await connect(f"{env.ws_url}{BASE}ws")
    await ws.send("ping")
    assert await ws.recv() == "ping"
    await ws.close(code=4000, reason="bye")
    await asyncio.wait_for(STATE.ws_disconnected.wait(), timeout=5)
    assert STATE.ws_disconnects[-1] == 4000


async def test_websocket_refused_upstream_rejects_handshake(env: Env) -> None:
    with pytest.raises(InvalidStatus) as caught:
        await connect(f"{env.ws_url}/passthrough/refused/1/ws")
    assert caught.value.response.status_code == 502
    assert json.loads(caught.value.response.body) == {"success": False,
                                                      "message": NOT_ANSWERING}
    # Without the websocket.http.response extension: closed with 1011 before acceptance,
    # which uvicorn answers with 403.
    with pytest.raises(InvalidStatus) as caught:
        await connect(f"{env.ws_url}/passthrough/noext/1/ws")
    assert caught.value.response.status_code == 403


async def test_websocket_upstream_rejection_relayed(env: Env) -> None:
    with pytest.raises(InvalidStatus) as caught:
        await connect(f"{env.ws_url}{BASE}reject")
    assert caught.value.response.status_code == 403


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


@pytest.fixture(scope="module")
async def unix(env: Env) -> AsyncIterator[UnixEnv]:
    """Routes ``sock`` (the upstream over a socket), ``decoy`` (a decoy, directly) and the
    ones that must be refused: ``sock-link`` (a link to the decoy), ``sock-uid`` (the decoy
    with another owner expected), ``sock-foreign`` (a socket owned by 65534, ours expected),
    ``sock-missing``, ``sock-file`` and ``sock-dir``."""
    relay = env.routes["h"][0]
    uid = os.getuid()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:  # short: AF_UNIX names are <108 B
        path = f"{tmp}/jupyter.sock"
        decoy = await start_decoy(f"{tmp}/decoy.sock")
        foreign = await start_decoy(f"{tmp}/foreign.sock")
        if uid == 0:
            os.chown(foreign.path, 65534, 65534)
        os.symlink(decoy.path, f"{tmp}/link.sock")
        Path(f"{tmp}/file.sock").write_bytes(b"")
        async with serve(upstream_app, uds=path, proxy_headers=False):
            env.routes.update({
                "sock": (relay, Upstream.unix(path, uid)),
                "decoy": (relay, Upstream.unix(decoy.path, uid)),
                "sock-link": (relay, Upstream.unix(f"{tmp}/link.sock", uid)),
                "sock-uid": (relay, Upstream.unix(decoy.path, uid + 1)),
                "sock-foreign": (relay, Upstream.unix(foreign.path, uid)),
                "sock-missing": (relay, Upstream.unix(f"{tmp}/missing.sock", uid)),
                "sock-file": (relay, Upstream.unix(f"{tmp}/file.sock", uid)),
                "sock-dir": (relay, Upstream.unix(tmp, uid)),
            })
            yield UnixEnv(path, decoy, foreign)
        for each in (decoy, foreign):
            each.server.close()
            await each.server.wait_closed()


def test_unix_upstream_is_hashable_and_absolute() -> None:
    one, same = Upstream.unix("/run/uws/1/jupyter.sock", 1000), Upstream.unix(
        "/run/uws/1/jupyter.sock", 1000)
    assert one == same and hash(one) == hash(same) and len({one, same}) == 1
    assert one != Upstream.unix("/run/uws/1/jupyter.sock", 1001)
    assert upstream_authority(one) == "localhost"
    with pytest.raises(ValueError, match="absolute"):
        Upstream.unix("jupyter.sock", 1000)


async def test_unix_socket_get_and_headers(env: Env, unix: UnixEnv,
                                           client: httpx.AsyncClient) -> None:
    relay_host = f"{HOST}:{env.relay_port}"
    r = await client.get("/passthrough/sock/1/echo/a%20b", params={"q": "1"},
                         headers={"Origin": f"http://{relay_host}",
                                  "Referer": f"http://{relay_host}/passthrough/sock/1/lab"})
    assert r.status_code == 200, r.text
    echo = r.json()
    assert (echo["raw_path"], echo["query"]) == ("/passthrough/sock/1/echo/a%20b", "q=1")
    # Jupyter compares Origin with Host: both name localhost over a socket.
    assert header_values(echo, "host") == ["localhost"]
    assert header_values(echo, "origin") == ["http://localhost"]
    assert header_values(echo, "referer") == ["http://localhost/passthrough/sock/1/lab"]
    assert header_values(echo, "x-forwarded-host") == [relay_host]


async def test_unix_socket_streams_both_ways(unix: UnixEnv, client: httpx.AsyncClient) -> None:
    size, received = 20 * MIB, 0
    async with client.stream("GET", "/passthrough/sock/1/big", params={"size": size}) as r:
        assert r.headers["content-length"] == str(size)
        async for chunk in r.aiter_raw():
            received += len(chunk)
    assert received == size
    r = await client.get("/passthrough/sock/1/chunked")
    assert (r.text, r.headers["transfer-encoding"]) == ("one two three", "chunked")
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(128):  # 8 MiB
            digest.update(BLOCK)
            yield BLOCK

    r = await client.put("/passthrough/sock/1/upload", content=body())
    assert r.json() == {"bytes": 128 * len(BLOCK), "sha256": digest.hexdigest()}


async def test_unix_socket_connections_pooled(env: Env, unix: UnixEnv,
                                              client: httpx.AsyncClient) -> None:
    relay = PassthroughRelay()
    upstream = Upstream.unix(unix.path, os.getuid())
    env.routes["sock-pooled"] = (relay, upstream)
    for _ in range(5):
        assert (await client.get("/passthrough/sock-pooled/1/echo")).status_code == 200
    assert relay._pool is not None and len(relay._pool._idle[upstream]) == 1
    await relay.aclose()


async def test_unix_socket_websocket_echo(env: Env, unix: UnixEnv) -> None:
    async with connect(f"{env.ws_url}/passthrough/sock/1/ws",
                       subprotocols=[KERNEL_PROTOCOL],  # type: ignore[list-item]
                       origin=f"http://{HOST}:{env.relay_port}",  # type: ignore[arg-type]
                       max_size=None) as ws:
        assert ws.subprotocol == KERNEL_PROTOCOL
        await ws.send("hello")
        assert await ws.recv() == "hello"
        big = secrets.token_bytes(2 * MIB)
        await ws.send(big)
        assert await ws.recv() == big
        await ws.send("headers?")
        headers = json.loads(await ws.recv())
    assert (headers["host"], headers["origin"]) == ("localhost", "http://localhost")


async def test_decoy_answers_when_addressed_directly(unix: UnixEnv,
                                                     client: httpx.AsyncClient) -> None:
    """The control for the refusals below: the decoy itself is reachable."""
    before = unix.decoy.connections
    r = await client.get("/passthrough/decoy/1/x")
    assert (r.status_code, r.text) == (200, "decoy")
    assert unix.decoy.connections == before + 1


@pytest.mark.parametrize("route", ["sock-link", "sock-uid", "sock-missing", "sock-file",
                                   "sock-dir"])
async def test_unix_socket_refused_without_connecting(env: Env, unix: UnixEnv,
                                                      client: httpx.AsyncClient,
                                                      route: str) -> None:
    """A link (even to a socket we own), a socket of another owner than expected, and
    anything not a socket: "not answering", and the decoy never sees a connection."""
    before = unix.decoy.connections
    r = await client.get(f"/passthrough/{route}/1/x")
    assert r.status_code == 502
    assert r.json() == {"success": False, "message": NOT_ANSWERING}
    with pytest.raises(InvalidStatus) as caught:
        await connect(f"{env.ws_url}/passthrough/{route}/1/ws")
    assert caught.value.response.status_code == 502
    assert unix.decoy.connections == before


async def test_socket_of_another_user_refused(env: Env, unix: UnixEnv,
                                              client: httpx.AsyncClient) -> None:
    if os.getuid() != 0:
        pytest.skip("giving a socket to another uid needs root")
    r = await client.get("/passthrough/sock-foreign/1/x")
    assert (r.status_code, r.json()["message"]) == (502, NOT_ANSWERING)
    with pytest.raises(InvalidStatus) as caught:
        await connect(f"{env.ws_url}/passthrough/sock-foreign/1/ws")
    assert caught.value.response.status_code == 502
    assert unix.foreign.connections == 0
    # The same socket with its real owner expected is reached: ownership decided it.
    env.routes["sock-65534"] = (env.routes["h"][0], Upstream.unix(unix.foreign.path, 65534))
    assert (await client.get("/passthrough/sock-65534/1/x")).text == "decoy"
    assert unix.foreign.connections == 1


# --- a real JupyterLab ----------------------------------------------------------------

@contextlib.contextmanager
def jupyter_lab(base_url: str, token: str) -> Any:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": f"{tmp}/runtime",
               "JUPYTER_CONFIG_DIR": f"{tmp}/config", "JUPYTER_DATA_DIR": f"{tmp}/data",
               "IPYTHONDIR": f"{tmp}/ipython"}
        args = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ip={HOST}",
                f"--port={port}", "--port-retries=0", f"--ServerApp.token={token}",
                f"--ServerApp.base_url={base_url}", f"--ServerApp.root_dir={tmp}",
                "--ServerApp.allow_remote_access=True", "--ServerApp.trust_xheaders=True"]
        if os.geteuid() == 0:
            args.append("--allow-root")
        with open(f"{tmp}/jupyter.log", "wb") as log:
            proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            yield port, proc, Path(f"{tmp}/jupyter.log")
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def execute_request(code: str, session: str) -> dict[str, Any]:
    return {"header": {"msg_id": secrets.token_hex(8), "msg_type": "execute_request",
                       "username": "test", "session": session, "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}


async def wait_for_jupyter(client: httpx.AsyncClient, base: str, token: str,
                           proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        r = await client.get(f"{base}api/status", headers={"Authorization": f"token {token}"})
        if r.status_code == 200:
            return
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"JupyterLab did not start:\n{log.read_text()}"
        await asyncio.sleep(0.3)


async def run_code(ws: Any, code: str) -> str:
    """What ``code`` printed, over the kernel's JSON WebSocket protocol."""
    await ws.send(json.dumps(execute_request(code, secrets.token_hex(8))))
    async with asyncio.timeout(60):
        while True:
            msg = json.loads(await ws.recv())
            if msg["msg_type"] == "stream":
                return msg["content"]["text"]


@pytest.mark.slow
async def test_real_jupyterlab_through_relay(env: Env) -> None:
    """A browser's way in: the token once, then Jupyter's cookie, its XSRF header and
    Origin checks (token-authenticated requests skip those), over HTTP and WebSocket."""
    pytest.importorskip("jupyterlab")
    pytest.importorskip("ipykernel")
    base, token = "/passthrough/127.0.0.1/1/", "x" + secrets.token_hex(8)
    same_origin = f"http://{HOST}:{env.relay_port}"
    evil = "https://evil.example"
    with jupyter_lab(base, token) as (port, proc, log):
        env.routes["127.0.0.1"] = (env.routes["h"][0], Upstream(HOST, port))
        async with httpx.AsyncClient(base_url=env.relay_url, timeout=60) as browser:
            await wait_for_jupyter(browser, base, token, proc, log)
            r = await browser.get(f"{base}lab", params={"token": token})
            assert r.status_code == 200 and "JupyterLab" in r.text
            xsrf = browser.cookies["_xsrf"]
            cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
            r = await browser.get(f"{base}api/kernels", headers={"Origin": same_origin})
            assert r.status_code == 200, r.text
            r = await browser.get(f"{base}api/kernels", headers={"Origin": evil})
            assert r.status_code == 404  # Jupyter's cross-origin answer still applies
            r = await browser.post(f"{base}api/kernels", json={"name": "python3"},
                                   headers={"Origin": same_origin, "X-XSRFToken": xsrf})
            assert r.status_code == 201, r.text
            kernel = r.json()["id"]

            url = f"{env.ws_url}{base}api/kernels/{kernel}/channels"
            with pytest.raises(InvalidStatus) as caught:
                await connect(url, origin=evil,  # type: ignore[arg-type]
                              additional_headers={"Cookie": cookie})
            assert caught.value.response.status_code == 403
            # No subprotocol: the JSON protocol keeps the test short.
            async with connect(url, origin=same_origin,  # type: ignore[arg-type]
                               additional_headers={"Cookie": cookie}, max_size=None) as ws:
                assert ws.subprotocol is None
                assert await run_code(ws, "print(6 * 7)") == "42\n"
            async with connect(url, origin=same_origin,  # type: ignore[arg-type]
                               additional_headers={"Cookie": cookie},
                               subprotocols=["x-unknown", KERNEL_PROTOCOL]) as ws:
                assert ws.subprotocol == KERNEL_PROTOCOL

            r = await browser.delete(f"{base}api/kernels/{kernel}",
                                     headers={"Origin": same_origin, "X-XSRFToken": xsrf})
            assert r.status_code == 204
