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
import contextlib
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from api.passthrough import NOT_ANSWERING
from controllers.base import ExternalAccount, LaunchRequest
from controllers.resources.local.procfs import is_alive, start_ticks
from tests.api.test_jobs import wait_status
from tests.api.test_workspaces import create, workspace_dir
from tests.conftest import make_user_token, traversable_dir
from tests.security.attacker import Batch, Lab, batch_script, start_lab, stop_job

# What a refused connection may look like from the job's namespace: nothing listens on its
# own loopback (refused), and there is no route anywhere else (unreachable).
REFUSED = {"ECONNREFUSED", "ENETUNREACH"}


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
            job_id=1, script=batch_script(targets, own_launcher), workdir=str(workdir),
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
