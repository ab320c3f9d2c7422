"""PassthroughRelay over WebSocket against a real upstream on loopback, no mocks: echo,
subprotocols, header rewriting, close codes both ways and refused handshakes. The last test
runs a real JupyterLab through the relay when it is installed. Clients are ``httpx`` and
``websockets``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from api.passthrough import NOT_ANSWERING, Upstream
from tests.passthrough.upstream import BASE, HOST, KERNEL_PROTOCOL, MIB, STATE, Env, free_port

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
