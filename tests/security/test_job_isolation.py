"""Attacks from INSIDE a real job, as a user's own code would make them.

Each test reproduces one attack and asserts its outcome. The attacker's code runs two ways:

* in a real JupyterLab kernel of user A, started through the API and reached through the
  passthrough (Jupyter's REST API and the kernel's WebSocket, with the API header and
  Jupyter's token): the interactive path every user has;
* as a batch job: a bash script launched by a :class:`LocalResource` built here in
  multi-user mode (the test config has no job type running a user's script), as a
  throwaway OS account, with its state under a directory of its own.

The targets are the real server's: user B's workspace file, ``/etc/shadow``, the server's
secret key, PostgreSQL's data directory and Unix socket, the worker's job state, another
user's session socket and token, and the control plane's loopback ports (PostgreSQL,
Temporal, the API with its metrics).

Jobs run as the OS accounts the test config creates (comment ``uws-test``); a pytest
session starting elsewhere on the machine kills every such account's processes
(``tests/conftest.py``), which ends these jobs with exit code 137.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from api.passthrough import NOT_ANSWERING
from controllers.base import ExternalAccount, LaunchRequest
from controllers.resources.local.procfs import is_alive, start_ticks
from tests.api.test_jobs import wait_status
from tests.api.test_workspaces import create, workspace_dir
from tests.conftest import TEST_CONFIG, eventually, make_user_token, traversable_dir

# What a refused connection may look like from the job's namespace: nothing listens on its
# own loopback (refused), and there is no route anywhere else (unreachable).
REFUSED = {"ECONNREFUSED", "ENETUNREACH"}


# --- the attacker's tools -----------------------------------------------------------------

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


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def victim(client, api_client_key: str, data_dir: Path) -> dict[str, Any]:
    """User B: a workspace holding a private file, and a finished job of theirs (whose
    spec.json stays in the worker's state dir)."""
    username = f"victim{secrets.token_hex(4)}"
    auth = {"UWS-Authorization":
            f"Token {await make_user_token(client, api_client_key, username)}"}
    ws = await create(client, auth, name="b-private", workspace_details={
        "files": [{"name": "secret.txt", "content": "B's private notes"}]})
    secret = workspace_dir(data_dir, ws["id"]) / "secret.txt"
    assert secret.is_file()
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "local_test_job"})
    assert r.status_code == 200, r.text
    job_id = r.json()["data"]["job"]["id"]
    done = await wait_status(client, auth, job_id, "complete", "failed")
    assert done["status"] == "complete", done
    spec = data_dir / "local-jobs" / str(job_id) / "spec.json"
    assert spec.is_file()  # root sees it: the target exists
    return {"auth": auth, "username": username, "file": secret, "spec": spec,
            "job_id": job_id}


@pytest.fixture(scope="module")
async def lab(client, api_client_key: str, data_dir: Path, server_url: str
              ) -> AsyncIterator[Lab]:
    """User A's JupyterLab, shared by the read-only attacks."""
    auth = {"UWS-Authorization": f"Token {await make_user_token(client, api_client_key)}"}
    started = await start_lab(client, auth, data_dir, server_url)
    yield started
    await stop_job(client, auth, started.job_id)


def _target(host_port: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    return host, int(port)


@pytest.fixture(scope="module")
async def targets(client, settings, data_dir: Path, temporal_env, victim, lab
                  ) -> dict[str, Any]:
    """What the attacker goes for; each one checked to exist from the test (root)."""
    secret_key = data_dir / "secret_key"
    assert secret_key.is_file() and secret_key.stat().st_size > 0, \
        "the API did not create its secret key under the data dir"
    conn = await asyncpg.connect(settings.database_url)
    try:
        pg_data = await conn.fetchval("SHOW data_directory")
        socket_dirs = await conn.fetchval("SHOW unix_socket_directories")
        pg_port = int(await conn.fetchval("SHOW port"))
    finally:
        await conn.close()
    assert os.listdir(pg_data)  # root can list it
    database = urlsplit(settings.database_url)
    ports = {
        "postgres": ("127.0.0.1" if database.hostname in (None, "localhost")
                     else database.hostname, database.port or 5432),
        "temporal": _target(temporal_env.client.service_client.config.target_host),
        "api": ("127.0.0.1" if client.base_url.host == "localhost" else client.base_url.host,
                client.base_url.port),
    }
    for host, port in ports.values():  # the ports really are open, to the test
        socket.create_connection((host, port), timeout=5).close()
    own_spec = data_dir / "local-jobs" / str(lab.job_id) / "spec.json"
    assert own_spec.is_file()
    # The worker's launcher, which forks a root supervisor for any job named to it.
    launchers = sorted((data_dir / "local-jobs").glob("launcher-*.sock"))
    assert launchers, "no launcher socket: the lab's job was not started by one"
    return {
        "launcher_socket": str(launchers[0]),
        "files": {"other_user_file": str(victim["file"]), "shadow": "/etc/shadow",
                  "secret_key": str(secret_key), "other_job_spec": str(victim["spec"]),
                  "own_job_spec": str(own_spec)},
        "dirs": {"postgres_data": pg_data, "job_state": str(data_dir / "local-jobs"),
                 "sessions": str(data_dir / "sessions")},
        "ports": ports,
        "postgres_sockets": [f"{d.strip()}/.s.PGSQL.{pg_port}"
                             for d in socket_dirs.split(",") if d.strip().startswith("/")],
        "database": database.path.lstrip("/"),
    }


@dataclass
class Batch:
    uid: int
    results: dict[str, tuple[str, str]]  # probe name -> (ok|fail, its output)


def _batch_script(targets: dict[str, Any], own_launcher: Path) -> str:
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


@pytest.fixture(scope="module")
async def batch(targets: dict[str, Any]) -> AsyncIterator[Batch]:
    """The same attacks as a batch job: a bash script run by a multi-user LocalResource as
    a throwaway OS account (made here, removed at the end)."""
    from controllers.auth.accounts import AccountSettings
    from controllers.auth.local import LocalUserAuthentication
    from controllers.resources.local import LocalResource

    name = f"uwst{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--no-create-home", "--comment", "uws-test", name],
                   check=True, capture_output=True)
    root = traversable_dir("uws-batch-")
    resource = LocalResource(
        "batch", LocalResource.Settings(state_dir=str(root / "local-jobs"),
                                        sessions_dir=str(root / "sessions")),
        storage=None,  # type: ignore[arg-type]  # not used by this resource
        auth=LocalUserAuthentication("a", AccountSettings(accounts="multi_user")),
        passthrough_domain="http://127.0.0.1", parameter_mapping={},
    )
    handle = None
    try:
        assert resource.isolated
        await resource.prepare()
        entry = pwd.getpwnam(name)
        workdir = root / "work"
        workdir.mkdir(mode=0o700)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
        account = ExternalAccount(username=name, uid=entry.pw_uid, gid=entry.pw_gid,
                                  home=entry.pw_dir)
        own_launcher = root / "local-jobs" / f"launcher-{os.getpid()}.sock"
        handle = await resource.launch(LaunchRequest(
            job_id=1, script=_batch_script(targets, own_launcher), workdir=str(workdir),
            account=account))
        assert own_launcher.exists()  # the one that forked the job's supervisor
        state = await resource.wait(handle, 120)
        assert (state.status, state.exit_code) == ("complete", 0), state
        results = {}
        for line in (workdir / "job.log").read_text().splitlines():
            probe, _, rest = line.partition("\t")
            status, _, out = rest.partition("\t")
            results[probe] = (status, out)
        yield Batch(uid=entry.pw_uid, results=results)
    finally:
        if handle is not None:
            await resource.stop(handle, 1.0)
        subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# --- 1. who the job runs as ---------------------------------------------------------------


@pytest.mark.slow
async def test_job_runs_as_its_owner_never_root_nor_the_server(lab: Lab, batch: Batch) -> None:
    """Attack 1: code in a job checks whether it holds root's or the server's identity
    (which would open every user's files and the server's state)."""
    server = os.geteuid()
    ids = await lab.probe("[os.getuid(), os.geteuid(), os.getgid(), os.getegid()]")
    uid, euid, gid, egid = ids
    assert uid == euid and gid == egid, ids
    assert uid not in (0, server)
    assert gid != 0
    assert uid == lab.proxy["uid"]  # the job's owner's own account
    assert pwd.getpwuid(uid).pw_gecos == "uws-test"

    for probe in ("uid", "real_uid"):
        status, out = batch.results[probe]
        assert status == "ok", (probe, out)
        assert int(out) not in (0, server)
        assert int(out) == batch.uid


# --- 2. files -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_job_cannot_read_others_files_nor_server_state(
    lab: Lab, batch: Batch, targets: dict[str, Any]
) -> None:
    """Attack 2: user A's job opens user B's workspace file, /etc/shadow, the server's
    signing key and job specs, and lists PostgreSQL's data dir, the worker's job state and
    the sessions directory."""
    files, dirs = targets["files"], targets["dirs"]
    got = await lab.probe(
        "{" + ", ".join(f"{name!r}: read({path!r})" for name, path in files.items()) + ", "
        + ", ".join(f"{name!r}: listdir({path!r})" for name, path in dirs.items()) + "}")
    assert got == {name: "EACCES" for name in [*files, *dirs]}

    for name in files:
        status, out = batch.results[f"read:{name}"]
        assert status == "fail" and "Permission denied" in out, (name, out)
    for name in dirs:
        status, out = batch.results[f"list:{name}"]
        assert status == "fail" and "Permission denied" in out, (name, out)


# --- 3. network ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_job_cannot_reach_the_control_plane(
    lab: Lab, batch: Batch, targets: dict[str, Any]
) -> None:
    """Attack 3: the job connects to PostgreSQL, the Temporal frontend and the API's own
    port (its /metrics) on loopback, which the test itself reaches (the targets fixture
    proved each port open); and looks for any interface besides loopback."""
    ports = targets["ports"]
    got = await lab.probe(
        "{" + ", ".join(f"{name!r}: connect({host!r}, {port})"
                        for name, (host, port) in ports.items()) + "}")
    assert set(got) == set(ports)
    for name, outcome in got.items():
        assert outcome in REFUSED, (name, ports[name], outcome)
    # The interfaces of the job's own namespace: only its loopback. (/sys/class/net is no
    # witness: sysfs lists the devices of the namespace that mounted it, the host's.)
    names = await lab.probe(
        "[sorted(n for _, n in socket.if_nameindex()),"
        " sorted(line.split(':')[0].strip() for line in open('/proc/self/net/dev')"
        "        .read().splitlines()[2:]),"
        " os.readlink('/proc/self/ns/net')]")
    assert names[:2] == [["lo"], ["lo"]], names
    assert names[2] != os.readlink("/proc/self/ns/net")  # not the server's namespace

    for name in ports:
        status, out = batch.results[f"connect:{name}"]
        assert status == "fail", (name, out)
        assert "Connection refused" in out or "Network is unreachable" in out, (name, out)
    assert batch.results["net"] == ("ok", "lo")
    status, namespace = batch.results["netns"]
    assert status == "ok" and namespace.startswith("net:[")
    assert namespace != os.readlink("/proc/self/ns/net")
    # And still open to the test right now: the job's failures are its namespace's.
    for host, port in ports.values():
        socket.create_connection((host, port), timeout=5).close()


@pytest.mark.slow
async def test_job_cannot_sign_in_to_postgres_over_its_unix_socket(
    client, lab: Lab, targets: dict[str, Any], victim: dict[str, Any]
) -> None:
    """Attack 3b: a network namespace stops TCP, not Unix sockets, which live in the file
    system every job shares. The job's code finds PostgreSQL's socket (where the server's
    own database listens) and signs in as ``postgres``, to read every user's API token."""
    sockets = targets["postgres_sockets"]
    assert sockets, "the test database has no Unix socket: nothing to attack"
    for path in sockets:
        assert os.path.exists(path)  # it is there, to root
        got = await lab.probe(f"postgres_unix({path!r}, {targets['database']!r})")
        if got["connect"] == "ok" and got.get("auth") == "ok":
            # What the attacker gained: user B's API key, used as B against the API.
            stolen = got["api_keys"].get(victim["username"], "")
            r = await client.get("/workspaces/", headers={"UWS-Authorization": f"Token {stolen}"})
            listed = [w["name"] for w in r.json().get("data", {}).get("workspaces", [])] \
                if r.status_code == 200 else []
            pytest.fail(
                f"a job (uid {lab.proxy['uid']}, own network namespace) signed in to the "
                f"server's PostgreSQL as its superuser through {path}, with no password, and "
                f"read {len(got['api_keys'])} users' API keys; with user B's key, GET "
                f"/workspaces/ answered {r.status_code} listing B's workspaces {listed}")


# --- 4. forged records --------------------------------------------------------------------


@pytest.fixture
async def bystander() -> AsyncIterator[subprocess.Popen]:
    """An unrelated process of the test's (root), its own process group: what a forged
    launch record would have the worker signal."""
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.slow
async def test_forged_connection_and_launch_records_change_nothing(
    client, api_client_key, data_dir: Path, server_url: str, temporal_env,
    bystander: subprocess.Popen
) -> None:
    """Attack 4: from the kernel, the job writes the records an earlier version trusted in
    its job directory: ``.uws-connection.json`` sending the passthrough to Temporal, and a
    ``.uws-launch.json`` (and ``.uws-pid``) naming an unrelated root process with absurd
    CPUs and start time, hoping the worker connects there, kills that process on stop and
    bills a fortune; it also tries to write into ``.jobs/`` through the workspace API."""
    auth = {"UWS-Authorization": f"Token {await make_user_token(client, api_client_key)}"}
    lab = await start_lab(client, auth, data_dir, server_url)
    try:
        temporal_host, temporal_port = _target(
            temporal_env.client.service_client.config.target_host)
        pid, ticks = bystander.pid, start_ticks(bystander.pid)
        forged_launch = {
            "id": pid, "pgid": pid, "start_ticks": ticks, "job_pid": pid, "job_ticks": ticks,
            "supervisor_pid": pid, "supervisor_ticks": ticks, "job_id": lab.job_id,
            "workdir": str(lab.workdir), "cpus": 10**9, "hostname": "127.0.0.1",
            "started_at": 0.0, "state_dir": str(lab.workdir),
        }
        forged_connection = {"host": temporal_host, "port": temporal_port, "token": "0" * 48}
        code = (
            "import json, os\n"
            f"os.chdir({str(lab.workdir)!r})\n"
            f"json.dump({forged_connection!r}, open('.uws-connection.json', 'w'))\n"
            f"json.dump({forged_launch!r}, open('.uws-launch.json', 'w'))\n"
            f"open('.uws-pid', 'w').write('{pid}')\n"
            f"open('.uws-exit', 'w').write('0')\n"
            "print(sorted(os.listdir('.')))\n"
        )
        out = await lab.run(code)
        assert ".uws-launch.json" in out and ".uws-connection.json" in out
        assert json.loads((lab.workdir / ".uws-launch.json").read_text())["pgid"] == pid

        # Through the API: a name under .jobs/ is server state, never written by name.
        for name in (f".jobs/{lab.job_id}/x", f".jobs/{lab.job_id}/.uws-launch.json"):
            r = await client.put(f"/workspaces/{lab.workspace_id}/", headers=auth, json={
                "workspace_details": {"files": [{"name": name, "content": "{}"}]}})
            assert r.status_code == 400, r.text
            assert r.json() == {"success": False,
                                "message": f"Invalid file path specified {name}"}
        assert not (lab.workdir / "x").exists()
        assert json.loads((lab.workdir / ".uws-launch.json").read_text())["pgid"] == pid

        # The passthrough still reaches the same Jupyter (our kernel is there), not Temporal.
        r = await client.get(lab.base + "api/status", headers=lab.jupyter)
        assert r.status_code == 200, r.text
        assert {"started", "last_activity", "kernels"} <= set(r.json())
        r = await client.get(lab.base + "api/kernels", headers=lab.jupyter)
        assert r.status_code == 200
        assert lab.kernel_id in {k["id"] for k in r.json()}
    finally:
        done = await stop_job(client, auth, lab.job_id)
    assert done["status"] == "complete", done
    # The stop signalled the job's own tree only: the bystander lives on.
    assert is_alive(pid, ticks)
    assert bystander.poll() is None
    # Billed from the server's own clock and grant: about a minute, one CPU.
    assert done["core_hours"] is not None
    assert 0 <= done["core_hours"] < 1, done["core_hours"]


@pytest.mark.slow
async def test_job_cannot_reach_another_users_session(
    client, api_client_key, data_dir: Path, server_url: str, lab: Lab
) -> None:
    """Attack 4b: user C's job goes for user A's running JupyterLab: reads its token file,
    connects to its Unix socket, lists the sessions directory, asks the passthrough for A's
    session with C's own credentials, and finally swaps C's own session socket (C owns its
    directory) for a link to A's, so that the passthrough would carry C's requests there."""
    auth = {"UWS-Authorization": f"Token {await make_user_token(client, api_client_key)}"}
    mine = await start_lab(client, auth, data_dir, server_url)
    try:
        a_socket = lab.proxy["socket"]
        a_token = str(Path(a_socket).with_name("token"))
        assert Path(a_token).is_file()  # root sees A's token file
        got = await mine.probe(f"[read({a_token!r}), connect_unix({a_socket!r}), "
                               f"listdir({str(data_dir / 'sessions')!r})]")
        assert got == ["EACCES", "EACCES", "EACCES"]
        r = await client.get(lab.base + "api/status", headers=mine.jupyter)
        assert r.status_code == 404, r.text  # someone else's job looks like no job

        my_socket = mine.proxy["socket"]
        await mine.run(f"import os\nos.rename({my_socket!r}, {my_socket + '.real'!r})\n"
                       f"os.symlink({a_socket!r}, {my_socket!r})\n")
        assert os.path.islink(my_socket)
        # Even with A's own Jupyter token, C's passthrough never connects through the link.
        stolen = {**auth, "Authorization": f"token {lab.token}"}
        with pytest.raises(InvalidStatus) as rejected:
            async with connect("ws" + mine.base.removeprefix("http")
                               + f"api/kernels/{lab.kernel_id}/channels",
                               additional_headers=stolen):
                pass
        assert rejected.value.response.status_code == 502
        await asyncio.sleep(9)  # past the relay's idle-connection lifetime: a fresh connect
        r = await client.get(mine.base + "api/status", headers=stolen)
        assert r.status_code == 502, r.text
        assert r.json() == {"success": False, "message": NOT_ANSWERING}
    finally:
        await stop_job(client, auth, mine.job_id)


@pytest.mark.slow
async def test_job_cannot_ask_the_launcher_for_a_supervisor(
    lab: Lab, batch: Batch, targets: dict[str, Any]
) -> None:
    """Attack 4c: the worker's launcher forks a root supervisor for a job named on its
    Unix socket. The job connects to it (the server's, and the very one that started it),
    to name a job of its choosing."""
    launcher = targets["launcher_socket"]
    assert await lab.probe(f"connect_unix({launcher!r})") == "EACCES"
    for name in ("launcher:own", "launcher:server"):
        status, out = batch.results[name]
        assert status == "fail" and "Permission denied" in out, (name, out)


# --- 5. passthrough paths -----------------------------------------------------------------


async def raw_get(server_url: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (httpx would remove dot segments)."""
    url = urlsplit(server_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\n{head}"
                     "Connection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


@pytest.mark.slow
async def test_passthrough_paths_cannot_climb_out_of_the_session(
    lab: Lab, victim: dict[str, Any], server_url: str
) -> None:
    """Attack 5: the owner of a running session sends dot segments (plain, percent-encoded,
    with encoded slashes or backslashes) to climb from their session's base to the session
    server's root, Temporal's HTTP API style paths, or another user's session."""
    base = lab.proxy["path"]
    # The raw client and the credentials work: a path inside reaches Jupyter.
    status, body = await raw_get(server_url, f"{base}api/status", lab.jupyter)
    assert status == 200 and b"kernels" in body, body
    escapes = [
        f"{base}../../api/v1/namespaces",
        f"{base}../../../api/v1/namespaces/default/workflows",
        f"{base}%2e%2e/%2e%2e/api/v1/namespaces",
        f"{base}%2E%2E/%2e%2E/api/v1/namespaces",
        f"{base}..%2f..%2fapi%2fv1%2fnamespaces",
        f"{base}..%5c..%5capi/v1/namespaces",
        f"{base}.%2e/{victim['job_id']}/api/status",
        f"{base}../{victim['job_id']}/api/contents",
        f"{base}api/../../../metrics",
        f"{base}./api/status",
    ]
    for path in escapes:
        status, body = await raw_get(server_url, path, lab.jupyter)
        assert status == 400, (path, status, body)
        assert json.loads(body) == {"success": False, "message": "Invalid session path."}, path


# --- 6. the session token in workflow histories ------------------------------------------


def _decoded_payloads(node: Any) -> Iterator[bytes]:
    """Every ``data`` field of a history's JSON, base64-decoded (payloads are base64)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                with contextlib.suppress(binascii.Error, ValueError):
                    yield base64.b64decode(value, validate=True)
            yield from _decoded_payloads(value)
    elif isinstance(node, list):
        for item in node:
            yield from _decoded_payloads(item)


def _command_lines() -> Iterator[bytes]:
    """Every process's command line, as any account may read it from /proc."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                yield Path(f"/proc/{entry}/cmdline").read_bytes()


@pytest.mark.slow
async def test_session_token_is_in_no_history_nor_command_line(
    client, api_client_key, data_dir: Path, server_url: str, temporal_env
) -> None:
    """Attack 6: whoever can read Temporal's histories (its UI, an operator, a replay file)
    or any process's command line (every account, through /proc) looks there for a
    session's Jupyter token, which opens the session without the owner's sign-in."""
    auth = {"UWS-Authorization": f"Token {await make_user_token(client, api_client_key)}"}
    lab = await start_lab(client, auth, data_dir, server_url)
    try:
        assert re.fullmatch(r"[0-9a-f]{16,128}", lab.token)
        token = lab.token.encode()
        assert not [line for line in _command_lines() if token in line]
        assert token not in (lab.workdir / "job.sh").read_bytes()
    finally:
        done = await stop_job(client, auth, lab.job_id)
    assert done["status"] == "complete", done

    handle = temporal_env.client.get_workflow_handle(f"job-{lab.job_id}")

    async def closed() -> bool:
        return (await handle.describe()).status.name != "RUNNING"

    await eventually(closed, timeout=60, interval=0.5)
    history = await handle.fetch_history()
    text = history.to_json()
    assert lab.token not in text
    payloads = list(_decoded_payloads(json.loads(text)))
    assert payloads  # the history does carry payloads: we looked inside them
    for payload in payloads:
        assert token not in payload
        assert lab.token not in payload.decode("utf-8", errors="replace")


# --- 7. personal mode ---------------------------------------------------------------------


def test_personal_mode_is_refused_as_root(tmp_path: Path) -> None:
    """Attack 7a: an operator (or a config change) runs the server in personal mode as
    root, where every job would run as root. Building the controllers refuses."""
    from app.controllers import load_controllers
    from core.config import ConfigError
    from core.settings import Settings

    text = TEST_CONFIG.read_text()
    assert 'accounts = "multi_user"' in text
    config = tmp_path / "personal.toml"
    config.write_text(text.replace('accounts = "multi_user"', 'accounts = "personal"'))
    assert os.geteuid() == 0
    with pytest.raises(ConfigError) as caught:
        load_controllers(Settings(config=config, data_dir=tmp_path, database_url=None))
    assert caught.value.key_path == (
        "available_user_authentication.local_auth.connection_details.accounts")
    assert "root" in caught.value.reason


@pytest.fixture
async def no_personal_owner(engine) -> AsyncIterator[None]:
    """The single-row owner table of this test database, empty before and after."""
    from db.tables import PersonalOwner

    await PersonalOwner.delete(force=True)
    yield
    await PersonalOwner.delete(force=True)


async def test_personal_owner_is_the_first_and_only(no_personal_owner) -> None:
    """Attack 7b: a second person signs in to a personal server, hoping to become its
    owner too (or instead)."""
    from db.accounts import claim_personal_owner

    assert await claim_personal_owner("alice") == "alice"
    assert await claim_personal_owner("bob") == "alice"
    assert await claim_personal_owner("alice") == "alice"


class _PersonalView:
    """The configured auth method as a personal server's: it serves one person."""

    serves_one_person = True

    def __init__(self, real) -> None:
        self.name = real.name
        self.identify = real.identify
        self.ensure_external_account = real.ensure_external_account


async def test_personal_server_refuses_a_second_user_token(
    client, api_client_key, app, no_personal_owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack 7c: through ``POST /tokens/`` of a personal server, a portal asks a key for
    a second person. Only the tokens route sees the personal auth (the resource keeps its
    multi-user one), by replacing what that route reads from the app state."""
    from api.routes import tokens
    from db.accounts import claim_personal_owner

    real = app.app.state.uws.controllers.api_auth
    state = SimpleNamespace(controllers=SimpleNamespace(api_auth=_PersonalView(real)))
    monkeypatch.setattr(tokens, "app_state", lambda request: state)
    owner = f"alice{secrets.token_hex(3)}"
    assert await claim_personal_owner(owner) == owner

    def body(username: str) -> dict[str, Any]:
        return {"client_token": api_client_key,
                "user_info": {"username": username, "email": f"{username}@example.org",
                              "first_name": username, "last_name": "T"}}

    r = await client.post("/tokens/", json=body(f"bob{secrets.token_hex(3)}"))
    assert r.status_code == 403, r.text
    assert r.json() == {"success": False,
                        "message": f"This server is in personal mode: it serves only {owner}."}
    r = await client.post("/tokens/", json=body(owner))  # the owner still signs in
    assert r.status_code == 200, r.text
    assert r.json()["token"]
