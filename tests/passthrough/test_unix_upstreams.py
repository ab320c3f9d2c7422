"""PassthroughRelay to an upstream on a Unix socket, no mocks: HTTP, streaming both ways,
pooling and WebSocket, and the sockets it must refuse without connecting (a link, a socket of
another owner than expected, anything not a socket), which decoys counting connections prove.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from api.passthrough import NOT_ANSWERING, PassthroughRelay, Upstream
from api.passthrough.upstream import upstream_authority
from tests.passthrough.upstream import (
    BLOCK,
    HOST,
    KERNEL_PROTOCOL,
    MIB,
    Env,
    UnixEnv,
    header_values,
)


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

