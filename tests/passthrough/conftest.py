"""Fixtures of the passthrough tests, per test module: ``env`` (the upstream and the relay,
each on a real uvicorn, and the routes by hostname), ``client`` (``httpx`` on the relay) and
``unix`` (the upstream on a Unix socket, next to decoy sockets that must never be reached).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from api.passthrough import PassthroughRelay, Upstream
from tests.passthrough.upstream import (
    HOST,
    Env,
    UnixEnv,
    flaky_upstream,
    free_port,
    relay_app,
    serve,
    start_decoy,
    upstream_app,
)


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

