"""The attacker's tools for the attacks from inside a job (``test_job_isolation`` and
``test_session_token_exposure``): probes that run in a JupyterLab kernel or a batch script,
and a JupyterLab of user A's started through the API and driven through the passthrough."""

from __future__ import annotations

import asyncio
import json
import shlex
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.client import connect

from tests.api.test_jobs import wait_status
from tests.api.test_workspaces import create, workspace_dir
from tests.conftest import eventually

# Loaded into the kernel before each attack: each probe answers "ok" or the errno's name.
KERNEL_PROBES = r'''
import errno as _errno, json, os, socket

def _outcome(action):
    try:
        action()
    except OSError as exc:
        return _errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"

def read(path):
    def action():
        with open(path, "rb") as f:
            f.read(1)
    return _outcome(action)

def listdir(path):
    return _outcome(lambda: os.listdir(path))

def connect(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        code = s.connect_ex((host, port))
    return _errno.errorcode.get(code, str(code)) if code else "ok"

def connect_unix(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        code = s.connect_ex(path)
    return _errno.errorcode.get(code, str(code)) if code else "ok"

def postgres_unix(path, database):
    """Sign in to PostgreSQL as its superuser over its Unix socket, speaking the wire
    protocol by hand; on success, read every user's API key (kept as issued)."""
    import struct
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
    except OSError as exc:
        return {"connect": _errno.errorcode.get(exc.errno, str(exc.errno))}
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data
    def message():
        kind = exact(1)
        return kind, exact(struct.unpack("!I", exact(4))[0] - 4)
    with s:
        params = b"user\0postgres\0database\0" + database.encode() + b"\0\0"
        body = struct.pack("!I", 196608) + params
        s.sendall(struct.pack("!I", len(body) + 4) + body)
        kind, payload = message()
        if kind != b"R":
            return {"connect": "ok", "auth": "refused", "detail": payload.decode(errors="replace")}
        code = struct.unpack("!I", payload[:4])[0]
        if code != 0:
            method = {3: "password", 5: "md5", 10: "scram"}.get(code, str(code))
            return {"connect": "ok", "auth": method}
        while kind != b"Z":
            kind, payload = message()
        query = (b"SELECT u.username || ' ' || t.key FROM uws_token t "
                 b"JOIN uws_user u ON u.id = t.\"user\"\0")
        s.sendall(b"Q" + struct.pack("!I", len(query) + 4) + query)
        keys, kind = {}, b""
        while kind != b"Z":
            kind, payload = message()
            if kind == b"D":
                username, _, key = payload[6:].decode().partition(" ")
                keys[username] = key
        return {"connect": "ok", "auth": "ok", "api_keys": keys}
'''

# The batch job's helpers: one line per probe, "<name>\t<ok|fail>\t<output on one line>".
BATCH_PRELUDE = r"""#!/bin/bash
set -u
probe() {
  local name=$1 out status
  shift
  if out=$("$@" 2>&1 </dev/null); then status=ok; else status=fail; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(printf '%s' "$out" | tr '\n\t' '  ' | head -c 400)"
}
tcp() { timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2"; }
unix() {
  timeout 5 python3 -I -c \
    'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1"
}
"""


@dataclass
class Lab:
    """User A's running JupyterLab, and a kernel in it the attacker's code runs in."""

    job_id: int
    workspace_id: int
    workspace: Path
    auth: dict[str, str]
    token: str
    proxy: dict[str, Any]
    base: str  # the passthrough base URL, ending in "/"
    kernel_id: str = ""

    @property
    def jupyter(self) -> dict[str, str]:
        """Both credentials: ours (stripped by the passthrough) and Jupyter's."""
        return {**self.auth, "Authorization": f"token {self.token}"}

    @property
    def workdir(self) -> Path:
        return self.workspace / ".jobs" / str(self.job_id)

    async def start_kernel(self, client) -> None:
        r = await client.post(self.base + "api/kernels", headers=self.jupyter,
                              json={"name": "python3"})
        assert r.status_code == 201, r.text
        self.kernel_id = r.json()["id"]

    async def run(self, code: str, timeout: float = 90) -> str:
        """Execute ``code`` in the kernel over its WebSocket; return what it printed."""
        uri = ("ws" + self.base.removeprefix("http")
               + f"api/kernels/{self.kernel_id}/channels?session_id={uuid.uuid4().hex}")
        msg_id = uuid.uuid4().hex
        request = {
            "header": {"msg_id": msg_id, "username": "attacker", "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3",
                       "date": datetime.now(UTC).isoformat()},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }
        printed: list[str] = []
        error: dict[str, Any] | None = None
        replied = idle = False
        async with asyncio.timeout(timeout), connect(
                uri, additional_headers=self.jupyter, max_size=None) as ws:
            await ws.send(json.dumps(request))
            while not (replied and idle):
                raw = await ws.recv()
                if not isinstance(raw, str):
                    continue
                message = json.loads(raw)
                if message.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = message["header"]["msg_type"], message["content"]
                if kind == "stream":
                    printed.append(content["text"])
                elif kind == "error":
                    error = content
                elif kind == "execute_reply":
                    replied = True
                elif kind == "status" and content["execution_state"] == "idle":
                    idle = True
        assert error is None, "\n".join(error["traceback"])
        return "".join(printed)

    async def probe(self, expression: str) -> Any:
        """The JSON value of ``expression`` evaluated in the kernel with KERNEL_PROBES."""
        out = await self.run(KERNEL_PROBES + f"\nprint(json.dumps({expression}))\n")
        return json.loads(out.strip().splitlines()[-1])


async def start_lab(client, auth: dict[str, str], data_dir: Path, server_url: str) -> Lab:
    """A JupyterLab job through the API, ready, with a kernel started through the passthrough."""
    ws = await create(client, auth, workspace_details={
        "files": [{"name": "hello.py", "content": "print('hi')"}]})
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "jupyter_lab"})
    assert r.status_code == 200, r.text
    job_id = r.json()["data"]["job"]["id"]

    async def ready() -> dict | None:
        r = await client.get(f"/jobs/{job_id}/", headers=auth)
        job = r.json()["data"]["jobs"][0]
        assert job["status"] in ("pending", "running"), (job["status"], job["job_details"])
        details = job["job_details"]["current_job_details"]
        return details if details.get("message") == "Webserver ready." else None

    details = await eventually(ready, timeout=180, interval=0.5)
    proxy = details["proxy_details"]
    assert set(proxy) == {"hostname", "path", "socket", "uid"}, proxy
    token = parse_qs(urlsplit(details["connection_details"]["url_path"]).query)["token"][0]
    lab = Lab(job_id=job_id, workspace_id=ws["id"], workspace=workspace_dir(data_dir, ws["id"]),
              auth=auth, token=token, proxy=proxy, base=f"{server_url}{proxy['path']}")
    await lab.start_kernel(client)
    return lab


async def stop_job(client, auth: dict[str, str], job_id: int) -> dict:
    r = await client.put(f"/jobs/{job_id}/stop/", headers=auth)
    assert r.status_code in (200, 400), r.text  # 400: it had already ended
    return await wait_status(client, auth, job_id, "complete", "failed", timeout=90)


@dataclass
class Batch:
    uid: int
    results: dict[str, tuple[str, str]]  # probe name -> (ok|fail, its output)


def batch_script(targets: dict[str, Any], own_launcher: Path) -> str:
    q = shlex.quote
    lines = [BATCH_PRELUDE, "probe uid id -u", "probe real_uid id -ru",
             f"probe launcher:own unix {q(str(own_launcher))}",
             f"probe launcher:server unix {q(targets['launcher_socket'])}",
             "probe net awk -F: 'NR > 2 { gsub(/ /, \"\", $1); print $1 }' /proc/self/net/dev",
             "probe netns readlink /proc/self/ns/net"]
    lines += [f"probe read:{name} cat {q(path)}" for name, path in targets["files"].items()]
    lines += [f"probe list:{name} ls -a {q(path)}" for name, path in targets["dirs"].items()]
    lines += [f"probe connect:{name} tcp {q(host)} {port}"
              for name, (host, port) in targets["ports"].items()]
    return "\n".join(lines) + "\nexit 0\n"
