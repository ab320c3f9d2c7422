"""The passthrough from the outside: a path must not climb out of its session, and only the
upstream a job registered is ever connected to.

The path check is tested as a function, then through the app as ``create_app`` wires the
route (trailing-slash wrapper, request metrics, authentication middleware, the ``/passthrough``
mount; the other routes left out, so the controllers need not load) on a real uvicorn. The
job table is a fake ``db.jobs.session_of`` naming a real Unix socket that counts connections,
and the requests carry a valid session cookie, so only the path check stands between a
``..`` and that socket. Requests are written by hand: ``httpx`` removes dot segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from litestar import Litestar
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from api.auth import AuthenticationMiddleware
from api.metrics import instrument
from api.passthrough import PassthroughRelay, Upstream
from api.passthrough import routes as route
from api.passthrough.routes import (
    INVALID_PATH,
    STARTING,
    Denied,
    passthrough,
    path_stays_in_session,
    upstream_from_proxy,
)
from api.passthrough.tickets import cookie_name, make_cookie
from api.principal import TokenCache
from api.session_activity import SessionActivity
from api.slashes import AppendSlash
from core.settings import Settings

HOST = "127.0.0.1"
NODE = "node1"
USER = 7
SECRET = b"k" * 32
TESTS = Path(__file__).parent.parent
SETTINGS = Settings(config=TESTS / "data" / "test-config.toml", database_url=None)

# Dot segments, however spelled; each under a valid session prefix.
ESCAPES = [
    "/passthrough/node1/1/..",
    "/passthrough/node1/1/../2/api/contents",
    "/passthrough/node1/1/%2e%2e",
    "/passthrough/node1/1/%2E%2e/",
    "/passthrough/node1/1/%2e%2E/%2e%2e/api",
    "/passthrough/node1/1/a/../..",
    "/passthrough/node1/1/./",
    "/passthrough/node1/1/%2e/lab",
    "/passthrough/node1/1/a%2F..%2F..%2Fapi",
    "/passthrough/node1/1/a%2f%2e%2e",
    "/passthrough/node1/1/..%5Capi",
    "/passthrough/node1/1/a%5C..%5C..",
    "/passthrough/node1/1/files%00.txt",
    "/passthrough/node1/1/%2e%2e%00",
    "/passthrough/../api/tokens",
]
# Look alike, stay inside: passed on unchanged.
INSIDE = [
    "/passthrough/node1/1/",
    "/passthrough/node1/1/lab",
    "/passthrough/node1/1/files/a..b/.hidden/...",
    "/passthrough/node1/1/files/..hidden%2E",
    "/passthrough/node1/1/files/%252e%252e",  # decoded once (as Tornado does): "%2e%2e"
    "/passthrough/node1/1/api/contents/a%20b",
    "/passthrough/node1/1//double//slash",
]


# --- the checks as functions ------------------------------------------------------------

@pytest.mark.parametrize("path", ESCAPES)
def test_escaping_paths_refused(path: str) -> None:
    assert not path_stays_in_session(path)


@pytest.mark.parametrize("path", INSIDE)
def test_inside_paths_allowed(path: str) -> None:
    assert path_stays_in_session(path)


def test_backslash_dot_dot_refused() -> None:
    assert not path_stays_in_session("/passthrough/node1/1/..\\api")
    assert not path_stays_in_session("/passthrough/node1/1/a\\..\\..")


SOCKET = {"hostname": NODE, "socket": "/run/uws/1/jupyter.sock", "uid": 1000,
          "path": "/passthrough/node1/1/"}
TCP = {"hostname": NODE, "port": 8888, "path": "/passthrough/node1/1/"}


def test_socket_proxy_details() -> None:
    assert upstream_from_proxy(SOCKET, NODE) == Upstream.unix("/run/uws/1/jupyter.sock", 1000)


def test_tcp_proxy_details() -> None:
    assert upstream_from_proxy(TCP, NODE) == Upstream(NODE, 8888)
    assert upstream_from_proxy({**TCP, "port": "8888"}, NODE) == Upstream(NODE, 8888)


@pytest.mark.parametrize("proxy", [
    SOCKET | {"hostname": "node2"}, TCP | {"hostname": "node2"},
], ids=["socket", "tcp"])
def test_other_host_is_403(proxy: dict[str, Any]) -> None:
    with pytest.raises(Denied) as caught:
        upstream_from_proxy(proxy, NODE)
    assert caught.value.status == 403


@pytest.mark.parametrize("proxy", [
    None, {}, [], "x", {"path": "/p/"},
    {k: v for k, v in SOCKET.items() if k != "hostname"},
    SOCKET | {"hostname": 5},
    SOCKET | {"socket": "jupyter.sock"}, SOCKET | {"socket": ""}, SOCKET | {"socket": 5},
    SOCKET | {"socket": None}, SOCKET | {"socket": "/run/x\x00.sock"},
    SOCKET | {"socket": "\x00abstract"},
    {k: v for k, v in SOCKET.items() if k != "uid"},
    SOCKET | {"uid": "1000"}, SOCKET | {"uid": None}, SOCKET | {"uid": True},
    SOCKET | {"uid": -1}, SOCKET | {"uid": 1000.0},
    {k: v for k, v in TCP.items() if k != "port"},
    TCP | {"port": None}, TCP | {"port": "x"}, TCP | {"port": 0}, TCP | {"port": 70000},
    TCP | {"port": [1]}, TCP | {"port": True}, TCP | {"port": "\uff18\uff18"},  # fullwidth digits
])
def test_malformed_proxy_details_are_503(proxy: Any) -> None:
    with pytest.raises(Denied) as caught:
        upstream_from_proxy(proxy, NODE)
    assert (caught.value.status, caught.value.message) == (503, STARTING)


# --- through the real app ---------------------------------------------------------------

@dataclass
class Target:
    url: str
    port: int
    socket_path: str
    connections: list[int] = field(default_factory=lambda: [0])
    lookups: list[int] = field(default_factory=list)  # job ids session_of was asked for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
async def target() -> AsyncIterator[Target]:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        sock_path = f"{tmp}/jupyter.sock"
        connections = [0]

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections[0] += 1
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close"
                             b"\r\n\r\nreached")
                await writer.drain()
            writer.close()

        upstream = await asyncio.start_unix_server(session, sock_path)
        relay = PassthroughRelay()
        litestar = instrument(Litestar(route_handlers=[passthrough],
                                       middleware=[AuthenticationMiddleware], debug=False))
        litestar.state.uws = SimpleNamespace(  # what the lifespan builds, minus the DB
            settings=SETTINGS, relay=relay, activity=SessionActivity(), secret_key=SECRET,
            token_cache=TokenCache(0))
        app = AppendSlash(litestar)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, lifespan="off",
                                               log_level="critical", access_log=False))
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        try:
            yield Target(f"http://{HOST}:{port}", port, sock_path, connections)
        finally:
            server.should_exit = True
            await task
            await relay.aclose()
            upstream.close()
            await upstream.wait_closed()


@pytest.fixture
def jobs(target: Target, monkeypatch: pytest.MonkeyPatch) -> Target:
    """Job 1 runs on NODE behind the target's socket (owned by us); job 2's proxy_details
    name a relative socket, job 3's a uid that is a string."""
    target.lookups.clear()
    proxy = {"hostname": NODE, "socket": target.socket_path, "uid": os.getuid(),
             "path": "/passthrough/node1/1/"}
    rows = {1: proxy, 2: proxy | {"socket": "jupyter.sock"}, 3: proxy | {"uid": "0"}}

    async def session_of(job_id: int) -> dict[str, Any] | None:
        target.lookups.append(job_id)
        if job_id not in rows:
            return None
        details = {"current_job_details": {"proxy_details": rows[job_id]}}
        return {"user": USER, "status": "running", "job_details": json.dumps(details)}

    monkeypatch.setattr(route.job_rows, "session_of", session_of)
    return target


def _cookie(job_id: int = 1) -> str:
    value = make_cookie(SECRET, job_id, USER, now=time.time(), ttl=3600)
    return f"{cookie_name(job_id)}={value}"


async def _get(target: Target, path: str, accept: str = "*/*", job_id: int = 1
               ) -> tuple[int, str, bytes]:
    """``GET path`` byte for byte as given: status, content type, body."""
    reader, writer = await asyncio.open_connection(HOST, target.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{target.port}\r\nAccept: {accept}\r\n"
                 f"Cookie: {_cookie(job_id)}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("content-type", ""), body


async def test_inside_path_reaches_the_session(jobs: Target) -> None:
    """The control: the same cookie and job with a clean path do connect."""
    before = jobs.connections[0]
    assert await _get(jobs, "/passthrough/node1/1/lab") == (200, "", b"reached")
    assert jobs.connections[0] == before + 1
    assert jobs.lookups == [1]


@pytest.mark.parametrize("path", [p for p in ESCAPES if "/1/" in p] + [
    "/passthrough/node1/1/..\\api", "/passthrough/node1/1/a/./b"])
async def test_escaping_path_is_400_before_any_lookup(jobs: Target, path: str) -> None:
    before = jobs.connections[0]
    status, content_type, body = await _get(jobs, path)
    assert (status, content_type) == (400, "application/json")
    assert json.loads(body) == {"success": False, "message": INVALID_PATH}
    assert jobs.lookups == [] and jobs.connections[0] == before


async def test_escaping_path_html_for_browsers(jobs: Target) -> None:
    status, content_type, body = await _get(jobs, "/passthrough/node1/1/%2e%2e/2/lab",
                                            accept="text/html,*/*")
    assert (status, content_type) == (400, "text/html; charset=utf-8")
    assert INVALID_PATH.encode() in body
    assert jobs.lookups == []


async def test_escaping_websocket_refused(jobs: Target) -> None:
    before = jobs.connections[0]
    for path in ("/passthrough/node1/1/../2/api/kernels/k/channels",
                 "/passthrough/node1/1/%2e%2e/x"):
        with pytest.raises(InvalidStatus) as caught:
            await connect(f"ws://{HOST}:{jobs.port}{path}",
                          additional_headers={"Cookie": _cookie()})
        assert caught.value.response.status_code == 403  # closed before acceptance (4400)
    assert jobs.lookups == [] and jobs.connections[0] == before


async def test_malformed_proxy_details_503_not_500(jobs: Target) -> None:
    for job_id in (2, 3):
        status, _, body = await _get(jobs, f"/passthrough/node1/{job_id}/lab", job_id=job_id)
        assert (status, json.loads(body)["message"]) == (503, STARTING)


async def test_other_hostname_is_403(jobs: Target) -> None:
    before = jobs.connections[0]
    status, _, _ = await _get(jobs, "/passthrough/node2/1/lab")
    assert status == 403
    assert jobs.connections[0] == before
