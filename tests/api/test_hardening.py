"""Hostile input through the real HTTP server: each answers a clear 4xx in the contract's
envelope and writes nothing (the workspace, on disk and through the API, is compared
before and after). Slow clients meet the configured read deadlines; ``uws api
--access-log`` logs each request without its query string."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets

from api.http.server import uvicorn_config
from core.settings import Settings
from tests.conftest import TEST_CONFIG, eventually, free_port, traversable_dir

TOO_DEEP = "Invalid JSON: nested deeper than 32 levels."
SURROGATE = "Invalid JSON: a string contains a lone UTF-16 surrogate (such as \\ud800)."
INCOMPLETE = "Malformed multipart body: it ends before its closing boundary."
JSON = {"content-type": "application/json"}


def envelope(message: str) -> dict[str, Any]:
    return {"success": False, "message": message}


# --- what "nothing written" is compared on ----------------------------------------------


def disk(path: Path) -> dict[str, bytes | str]:
    """Every entry below ``path``, dot-files and upload temporaries included."""
    found: dict[str, bytes | str] = {}
    for entry in sorted(path.rglob("*")):
        rel = str(entry.relative_to(path))
        if entry.is_symlink():
            found[rel] = f"-> {os.readlink(entry)}"
        elif entry.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = entry.read_bytes()
    return found


async def workspace(client: httpx.AsyncClient, auth: dict, wid: int) -> dict[str, Any]:
    r = await client.get(f"/workspaces/{wid}/", headers=auth)
    assert r.status_code == 200, r.text
    return r.json()["data"]["workspaces"][0]


async def listing(client: httpx.AsyncClient, auth: dict) -> list[dict[str, Any]]:
    r = await client.get("/workspaces/", headers=auth)
    return r.json()["data"]["workspaces"]


async def jobs(client: httpx.AsyncClient, auth: dict) -> list[dict[str, Any]]:
    r = await client.get("/jobs/", headers=auth)
    return r.json()["data"]["jobs"]


class Snapshot:
    """A workspace as the API and the disk show it, plus the user's other workspaces and
    jobs; ``assert_unchanged`` compares all of it."""

    def __init__(self, client: httpx.AsyncClient, auth: dict, wid: int, path: Path) -> None:
        self.client, self.auth, self.wid, self.path = client, auth, wid, path

    async def take(self) -> tuple[Any, ...]:
        return (await workspace(self.client, self.auth, self.wid), disk(self.path),
                await listing(self.client, self.auth), await jobs(self.client, self.auth),
                sorted(p.name for p in self.path.parent.iterdir()))

    async def __aenter__(self) -> Snapshot:
        self.before = await self.take()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert await self.take() == self.before


@pytest.fixture
async def target(client: httpx.AsyncClient, auth: dict, data_dir: Path) -> Snapshot:
    """A workspace holding ``a.txt`` ("original"), scanned, ready to compare."""
    r = await client.post("/workspaces/", headers=auth, json={
        "name": "target", "description": "before",
        "workspace_details": {"files": [{"name": "a.txt", "content": "original"}]}})
    assert r.status_code == 200, r.text
    wid = r.json()["data"]["workspace"]["id"]

    async def scanned() -> bool:
        ws = await workspace(client, auth, wid)
        return ws["workspace_details"]["current_workspace_details"]["files"] == [
            {"name": "/a.txt"}]

    await eventually(scanned)
    (path,) = (data_dir / "workspaces").glob(f"*/{wid}")
    return Snapshot(client, auth, wid, path)


# --- 1. inputs that answered 500 ---------------------------------------------------------


async def test_a_body_nested_100000_deep(client, auth, target: Snapshot) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    async with target:
        for method, path in (("POST", "/workspaces/"), ("PUT", f"/workspaces/{target.wid}/"),
                             ("PUT", f"/workspaces/{target.wid}/start/"),
                             ("POST", "/shared_workspaces/"), ("POST", "/tokens/")):
            r = await client.request(method, path, headers={**auth, **JSON}, content=deep)
            assert (r.status_code, r.json()) == (400, envelope(TOO_DEEP)), path


async def test_5000_nested_lists_in_workspace_details(client, auth, target: Snapshot) -> None:
    nested = "[" * 5000 + "]" * 5000
    async with target:
        for details in (f'{{"files": {nested}}}', f'{{"files": [], "x": {nested}}}',
                        f'{{"files": [{{"name": "b.txt", "content": {nested}}}]}}'):
            for method, path in (("POST", "/workspaces/"),
                                 ("PUT", f"/workspaces/{target.wid}/")):
                body = f'{{"name": "n", "description": "d", "workspace_details": {details}}}'
                r = await client.request(method, path, headers={**auth, **JSON}, content=body)
                assert (r.status_code, r.json()) == (400, envelope(TOO_DEEP)), (path, details)
        # The limit is on nesting, not on the contract's own shapes (4 levels).
        body = {"workspace_details": {"files": [{"name": "ok.txt", "content": "y"}]}}
        body["workspace_details"]["x"] = json.loads("[" * 28 + "]" * 28)
    r = await client.put(f"/workspaces/{target.wid}/", headers=auth, json=body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("where", ["name", "description", "file name", "file content",
                                   "symlink name", "job details", "user info"])
async def test_a_lone_surrogate(client, auth, api_client_key, target: Snapshot,
                                where: str) -> None:
    bad = "x\ud800y"
    bodies: dict[str, list[tuple[str, str, Any]]] = {
        "name": [("POST", "/workspaces/", {"name": bad, "description": "d"}),
                 ("PUT", f"/workspaces/{target.wid}/", {"name": bad})],
        "description": [("PUT", f"/workspaces/{target.wid}/", {"description": bad})],
        "file name": [("POST", "/workspaces/", {"name": "n", "description": "d",
                       "workspace_details": {"files": [{"name": bad, "content": "c"}]}}),
                      ("PUT", f"/workspaces/{target.wid}/",
                       {"workspace_details": {"files": [{"name": bad, "content": "c"}]}})],
        "file content": [("PUT", f"/workspaces/{target.wid}/",
                          {"workspace_details": {"files": [{"name": "a.txt",
                                                            "content": bad}]}})],
        "symlink name": [("PUT", f"/workspaces/{target.wid}/", {"workspace_details": {
            "symlinks": [{"name": bad, "source_path": "/tmp"}]}})],
        "job details": [("PUT", f"/workspaces/{target.wid}/start/",
                         {"job_type": "local_test_job", "job_details": {bad: 1}})],
        "user info": [("POST", "/tokens/", {"client_token": api_client_key,
                       "user_info": {"username": bad, "email": "s@example.org"}})],
    }
    async with target:
        for method, path, body in bodies[where]:
            # json.dumps escapes the surrogate as \ud800, as a JavaScript client would.
            r = await client.request(method, path, headers={**auth, **JSON},
                                     content=json.dumps(body))
            assert (r.status_code, r.json()) == (400, envelope(SURROGATE)), path


async def test_nan_and_infinity_are_not_json(client, auth, target: Snapshot) -> None:
    async with target:
        for value, message in (("NaN", "Invalid JSON: NaN is not valid JSON"),
                               ("-Infinity", "Invalid JSON: -Infinity is not valid JSON"),
                               ("1e999", "Invalid JSON: Number out of range: 1e999")):
            body = f'{{"job_type": "local_test_job", "job_details": {{"x": {value}}}}}'
            r = await client.put(f"/workspaces/{target.wid}/start/",
                                 headers={**auth, **JSON}, content=body)
            assert (r.status_code, r.json()) == (400, envelope(message)), value


async def test_a_name_over_256_characters_on_update(client, auth, target: Snapshot) -> None:
    async with target:
        for method, path in (("POST", "/workspaces/"), ("PUT", f"/workspaces/{target.wid}/")):
            r = await client.request(method, path, headers=auth,
                                     json={"name": "n" * 257, "description": "d"})
            assert (r.status_code, r.json()) == (
                400, envelope("'name' must be at most 256 characters.")), path
    r = await client.put(f"/workspaces/{target.wid}/", headers=auth, json={"name": "n" * 256})
    assert r.status_code == 200, r.text
    assert (await workspace(client, auth, target.wid))["name"] == "n" * 256


async def test_user_names_longer_than_their_columns(client, api_client_key) -> None:
    name = f"long{secrets.token_hex(4)}"
    r = await client.post("/tokens/", json={"client_token": api_client_key, "user_info": {
        "username": name, "email": f"{name}@example.org", "last_name": "l" * 151}})
    assert (r.status_code, r.json()) == (401, envelope("Incorrect authentication credentials."))


# --- 3. sizes --------------------------------------------------------------------------


async def test_a_60_mib_description(client, auth, target: Snapshot) -> None:
    huge = "d" * (60 * 1024**2)
    async with target:
        for method, path in (("POST", "/workspaces/"), ("PUT", f"/workspaces/{target.wid}/")):
            r = await client.request(method, path, headers=auth,
                                     json={"name": "n", "description": huge})
            assert (r.status_code, r.json()) == (
                400, envelope("'description' must be at most 65536 characters.")), path
    r = await client.put(f"/workspaces/{target.wid}/", headers=auth,
                         json={"description": "d" * 65536})
    assert r.status_code == 200, r.text


async def test_job_details_over_the_limit(client, auth, target: Snapshot) -> None:
    async with target:
        r = await client.put(f"/workspaces/{target.wid}/start/", headers=auth, json={
            "job_type": "local_test_job", "job_details": {"script": "x" * 1024**2}})
        assert (r.status_code, r.json()) == (
            400, envelope("'job_details' must be at most 1048576 bytes as JSON."))


async def test_a_json_body_over_the_limit(server_url: str, auth: dict,
                                          target: Snapshot) -> None:
    port = int(server_url.rsplit(":", 1)[1])
    async with target:
        head = (f"POST /workspaces/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"UWS-Authorization: {auth['UWS-Authorization']}\r\n"
                f"Content-Length: {64 * 1024**2 + 1}\r\n\r\n").encode()
        status, body, _ = await exchange(port, [head, b'{"name": "n", '])
        assert (status, body) == (413, envelope("Request body is larger than this server accepts."))


async def test_a_200_kb_header_and_5000_headers(client, auth) -> None:
    r = await client.get("/workspaces/", headers={**auth, "X-Big": "b" * 200_000})
    assert (r.status_code, r.json()) == (431, envelope("Request headers are too large."))
    many = [*auth.items(), *((f"X-H{i}", "1") for i in range(5000))]
    r = await client.get("/workspaces/", headers=many)
    assert (r.status_code, r.json()) == (431, envelope("Too many request headers."))
    # Real clients stay well inside: 90 headers of 500 bytes.
    usual = [*auth.items(), *((f"X-H{i}", "v" * 500) for i in range(90))]
    r = await client.get("/workspaces/", headers=usual)
    assert r.status_code == 200, r.text


# --- raw sockets against a server with short deadlines ---------------------------------


@asynccontextmanager
async def serving(app: Any, settings: Settings, **changes: Any) -> AsyncIterator[int]:
    """A second uvicorn on the session's app (whose lifespan already ran) with ``changes``
    to its settings; yields the port."""
    port = free_port()
    config = uvicorn_config(app, settings.model_copy(update=changes), host="127.0.0.1",
                            port=port, lifespan="off")
    server = uvicorn.Server(config)
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


async def exchange(port: int, pieces: list[bytes], pause: float = 0.0,
                   timeout: float = 10.0) -> tuple[int | None, Any, float]:
    """Send ``pieces`` (``pause`` s apart) until a whole answer arrives or the server
    closes; (status or None, JSON body or raw bytes, seconds it took)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()

    async def send() -> None:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(pause)

    async def answer() -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await reader.read(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return head + b"\r\n\r\n" + body + await reader.readexactly(length - len(body))

    sending = asyncio.create_task(send())
    try:
        data = await asyncio.wait_for(answer(), timeout)
    except ConnectionResetError:
        data = b""
    finally:
        elapsed = time.monotonic() - started
        sending.cancel()
        writer.close()
    if not data:
        return None, b"", elapsed
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body), elapsed
    except ValueError:
        return status, body, elapsed


async def test_slow_clients_meet_the_read_deadlines(app, settings: Settings, auth: dict,
                                                   target: Snapshot) -> None:
    async with serving(app, settings, header_timeout_seconds=1.0,
                       body_timeout_seconds=1.5) as port:
        # Headers sent byte by byte, never finished: 408 at the header deadline.
        line = b"GET /workspaces/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
        status, body, took = await exchange(port, [bytes([b]) for b in line], pause=0.02)
        assert (status, body) == (408, envelope("Request headers were not received in time."))
        assert 0.9 < took < 4, took
        # A connection that never sends a byte is closed at the same deadline.
        status, body, took = await exchange(port, [])
        assert (status, body) == (None, b"") and 0.9 < took < 4, took
        # A body that stops: 408 once it has paused for the body deadline.
        head = (f"PUT /workspaces/{target.wid}/upload/ HTTP/1.1\r\nHost: x\r\n"
                f"UWS-Authorization: {auth['UWS-Authorization']}\r\n"
                f"Content-Type: multipart/form-data; boundary=B\r\n"
                f"Content-Length: 100000\r\n\r\n").encode()
        part = (b'--B\r\nContent-Disposition: form-data; name="f"; filename="a.txt"\r\n\r\n'
                b"the new, unfinished content")
        async with target:
            status, body, took = await exchange(port, [head, part])
            assert (status, body) == (408, envelope("Request body was not received in time."))
            assert 1.4 < took < 4.5, took

            async def no_temporaries() -> bool:
                return not any(p.name.startswith(".uws") for p in target.path.iterdir())

            await eventually(no_temporaries, timeout=10)
        # The body deadline is per pause, not for the whole body: 3 pauses of 0.6 s pass.
        payload = json.dumps({"name": "slow but steady", "description": "d"}).encode()
        head = (f"POST /workspaces/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"UWS-Authorization: {auth['UWS-Authorization']}\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        status, body, took = await exchange(
            port, [head, payload[:10], payload[10:20], payload[20:]], pause=0.6)
        assert status == 200 and body["message"] == "Successful.", body
        assert took > 1.5


async def test_the_connection_limit(app, settings: Settings) -> None:
    busy = envelope("The server has too many open connections. Please try again shortly.")
    async with serving(app, settings, max_connections=3) as port:
        url = f"http://127.0.0.1:{port}"
        idle = [await asyncio.open_connection("127.0.0.1", port)]
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/job_types/")).status_code == 200  # 2 of 3
        idle.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.1)  # the server has accepted it
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.get("/job_types/")
            assert (r.status_code, r.json()) == (503, busy)
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with websockets.connect(f"ws://127.0.0.1:{port}/jobs/"):
                pass
        assert refused.value.response.status_code == 503
        for _, writer in idle:
            writer.close()


# --- 2. a truncated upload ----------------------------------------------------------------


def multipart(content: bytes, boundary: str = "XyZzY") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\n").encode() + content + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def test_a_truncated_upload_changes_nothing(client, auth, target: Snapshot) -> None:
    body, content_type = multipart(b"replacement")
    headers = {**auth, "content-type": content_type}
    cuts = {
        "no closing boundary": body.index(b"\r\n--XyZzY--"),
        "half the closing boundary": body.index(b"--XyZzY--") + 4,
        "closing boundary without its --": body.index(b"--XyZzY--") + 7,
        "inside the part's headers": body.index(b"Content-Type"),
    }
    async with target:
        for label, cut in cuts.items():
            r = await client.put(f"/workspaces/{target.wid}/upload/", headers=headers,
                                 content=body[:cut])
            assert (r.status_code, r.json()) == (400, envelope(INCOMPLETE)), label
        # Two files, the second cut short: neither lands.
        second, _ = multipart(b"never", boundary="XyZzY")
        second = second.replace(b'filename="a.txt"', b'filename="b.txt"')
        both = body[:body.index(b"--XyZzY--")] + second[:second.index(b"never") + 3]
        r = await client.put(f"/workspaces/{target.wid}/upload/", headers=headers, content=both)
        assert (r.status_code, r.json()) == (400, envelope(INCOMPLETE))
    # The whole body, even without the optional CRLF after its closing boundary, lands.
    r = await client.put(f"/workspaces/{target.wid}/upload/", headers=headers,
                         content=body[:-2])
    assert (r.status_code, r.json()) == (200, {"success": True,
                                               "message": "Successful upload."})
    assert (target.path / "a.txt").read_bytes() == b"replacement"


# --- 7. the access log --------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_access_log(database_url: str, temporal_env, settings: Settings,
                          log_format: str, tmp_path: Path) -> None:
    from tests.stack import Proc

    port = free_port()
    data = traversable_dir("uws-access-")
    env = {**os.environ, "UWS_DATABASE_URL": database_url, "UWS_CONFIG": str(TEST_CONFIG),
           "UWS_TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
           "UWS_TASK_QUEUE": settings.task_queue, "UWS_DATA_DIR": str(data),
           "UWS_HOST": "127.0.0.1", "UWS_PORT": str(port), "UWS_LOG_FORMAT": log_format,
           "UWS_BODY_TIMEOUT_SECONDS": "0.5"}
    api = Proc("api", [sys.executable, "-m", "app.cli", "api", "--access-log"],
               tmp_path / "api.log", env=env)
    api.start()
    secret = secrets.token_hex(8)
    try:
        await asyncio.to_thread(api.wait_for_port, port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get(f"/job_types/?token={secret}")).status_code == 200
            await http.get(f"/passthrough/localhost/1/lab?uws_ticket={secret}")
            assert (await http.get("/workspaces/")).status_code == 401
            r = await http.get("/", headers={"X-Big": "b" * 100_000})
            assert r.status_code == 431
        async with websockets.connect(f"ws://127.0.0.1:{port}/jobs/?token={secret}") as ws:
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                await ws.recv()  # accepted, then closed with 4401
        stalled = b"POST /tokens/ HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"
        assert (await exchange(port, [stalled]))[0] == 408

        def lines() -> list[str]:
            log = api.current_run_log()
            if log_format == "text":  # Litestar's line format, with our message at the end
                return [m.group(1) for line in log.splitlines() if "uws.access" in line
                        and (m := re.search(r"((?:[A-Z]+|-) \S+ \d{3} \S+)$", line))]
            entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
            return [f"{e['method']} {e['path']} {e['status']} {e['duration_ms']}ms"
                    for e in entries if e["logger"] == "uws.access"]

        async def all_logged() -> list[str] | None:
            return lines() if len(lines()) >= 6 else None

        logged = await eventually(all_logged, timeout=10)
    finally:
        api.stop(signal.SIGTERM)
        shutil.rmtree(data, ignore_errors=True)
    log = api.current_run_log()
    assert secret not in log, log
    shapes = [" ".join(line.split()[:3]) for line in logged]
    assert shapes == ["GET /job_types/ 200", "GET /passthrough/localhost/1/lab 403",
                      "GET /workspaces/ 401", "- - 431", "WEBSOCKET /jobs/ 101",
                      "POST /tokens/ 408"], logged
    assert all(line.split()[3].endswith("ms") for line in logged), logged
