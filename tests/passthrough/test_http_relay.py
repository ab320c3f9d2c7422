"""PassthroughRelay over HTTP against a real upstream on loopback, no mocks: methods, paths
and bodies, header rewriting, cookies, redirects and errors, connection reuse and limits,
failing or slow upstreams, and streaming both ways in bounded memory. The client is ``httpx``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from api.passthrough import NOT_ANSWERING, PassthroughRelay, Upstream, http_pool
from tests.passthrough.upstream import BASE, BLOCK, HOST, MIB, STATE, Env, header_values


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
