"""Job types: their scripts, and for the interactive ones, how a session is found.

A session listens where the resource decided (a Unix socket in its own directory, with the
token in a file next to it), never where the job says. JupyterLab runs for real through a
multi-user LocalResource as a throwaway OS account. The container runtime Appyter needs is
not on this machine: its script is syntax-checked, then run for real with a stand-in
runtime serving HTTP where the script publishes the container's port, so the script's own
port picking and its socket bridge are what the test talks to.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from controllers.auth.accounts import AccountSettings
from controllers.auth.local import LocalUserAuthentication
from controllers.base import ExternalAccount, JobContext, LaunchRequest, SessionEndpoint
from controllers.errors import InvalidRequest
from controllers.job_types.appyter import _BRIDGE_PY as BRIDGE
from controllers.job_types.appyter import AppyterJob
from controllers.job_types.jupyter_lab import JupyterLabJob, read_token
from controllers.job_types.local_test import LocalTestJob
from controllers.resources.local import LocalResource
from tests.conftest import (
    stop_leftover_jobs,
    throwaway_account,
    traversable_dir,
)

JUPYTER_START_LIMIT_S = 60.0
TOKEN = "0123456789abcdef" * 3


def context(workdir: Path, job_id: int = 12, session: SessionEndpoint | None = None,
            **details: str) -> JobContext:
    return JobContext(job_id=job_id, workdir=str(workdir), resource_name="local",
                      passthrough_domain="uws.example.org", job_details=details,
                      session=session)


def assert_valid_bash(script: str, where: Path) -> None:
    path = where / "check.sh"
    path.write_text(script)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a Unix socket's path must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="uws-jt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def socket_session(directory: Path, owner_uid: int | None = None) -> SessionEndpoint:
    """A session as the local resource makes one, here owned by us unless told otherwise."""
    return SessionEndpoint(socket_path=str(directory / "session.sock"),
                           token_file=str(directory / "token"),
                           owner_uid=os.geteuid() if owner_uid is None else owner_uid)


def write_token(session: SessionEndpoint, token: str = TOKEN) -> None:
    Path(session.token_file).write_text(token)


# --- an HTTP server on a Unix socket, as a session would be -------------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _handler(status: int, token: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = token is None or self.headers.get("Authorization") == f"token {token}"
            body = f"{self.path}".encode()
            self.send_response(status if ok else 403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def unix_server(short_dir: Path):
    """Start a server answering ``status`` (403 without ``token``, when one is given) on
    the session's socket."""
    servers: list[_UnixHTTPServer] = []

    def start(session: SessionEndpoint, status: int = 200,
              token: str | None = None) -> None:
        server = _UnixHTTPServer(session.socket_path, _handler(status, token))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# --- local test job -----------------------------------------------------------------------


def test_local_test_job_script(tmp_path):
    job = LocalTestJob("local_test", {"local": LocalTestJob.Settings(duration_seconds=0)})
    script = job.script(context(tmp_path, 31))
    assert_valid_bash(script, tmp_path)
    subprocess.run(["bash", "-c", script], cwd="/", check=True, timeout=30)
    assert "31" in (tmp_path / "test_job_output.txt").read_text()


def test_local_test_job_settings():
    job = LocalTestJob("local_test", {"local": LocalTestJob.Settings(time_limit_min=5)})
    assert job.default_time_limit_min("local") == 5
    assert job.default_time_limit_min("elsewhere") is None
    assert not job.interactive
    with pytest.raises(ValueError):
        LocalTestJob.Settings(duration_seconds=-1)
    with pytest.raises(ValueError):
        LocalTestJob.Settings(duraton_seconds=1)  # unknown keys are an error


# --- JupyterLab ---------------------------------------------------------------------------


def test_jupyter_script_is_quoted_valid_bash(tmp_path):
    workdir = tmp_path / "job dir; rm -rf x"
    session = socket_session(tmp_path / "sess ion")
    settings = JupyterLabJob.Settings(python="/opt/py env/bin/python",
                                      extra_args=["--ServerApp.x=a b"])
    job = JupyterLabJob("jupyter_lab", {"local": settings})
    script = job.script(context(workdir, 12, session, hostname="node-1",
                                workspace_path="/data/ws 1"))
    assert_valid_bash(script, tmp_path)
    assert f"cd {shlex.quote(str(workdir))}\n" in script
    assert "exec '/opt/py env/bin/python' -m jupyter lab" in script
    assert "--ServerApp.base_url=/passthrough/node-1/12/" in script
    assert "'--ServerApp.root_dir=/data/ws 1'" in script
    # It listens on the resource's socket, only for its own account; on no TCP port.
    assert shlex.quote(f"--ServerApp.sock={session.socket_path}") in script
    assert "--ServerApp.sock_mode=0600" in script
    assert "--port" not in script and "--ip" not in script
    # The token comes from the server's file into the environment, never onto argv.
    assert (f'export JUPYTER_TOKEN="$(cat {shlex.quote(session.token_file)})"\n'
            in script)
    assert "'--ServerApp.x=a b'" in script
    runtime = shlex.quote(str(workdir / ".jupyter" / "runtime"))
    assert f"export JUPYTER_RUNTIME_DIR={runtime}\n" in script
    assert job.interactive
    assert job.default_time_limit_min("local") == 60


def test_jupyter_script_on_a_compute_node_port(tmp_path):
    session = SessionEndpoint(host="node-7", port=8123, token_file="/run/t/token")
    script = JupyterLabJob("jupyter_lab", {}).script(context(tmp_path, 5, session))
    assert_valid_bash(script, tmp_path)
    assert "--ip=node-7" in script and "--port=8123" in script
    assert "--port-retries=0" in script  # that port or none: never another one
    assert "--ServerApp.sock" not in script


def test_jupyter_script_defaults(tmp_path):
    script = JupyterLabJob("jupyter_lab", {}).script(context(tmp_path, 3,
                                                             socket_session(tmp_path)))
    assert "--ServerApp.base_url=/passthrough/127.0.0.1/3/" in script
    assert f"--ServerApp.root_dir={tmp_path}" in script
    assert f"exec {shlex.quote(sys.executable)} -m jupyter lab" in script


def test_jupyter_script_exports_the_token_from_its_file(short_dir):
    """The lines before the ``exec`` run for real: the token the server wrote reaches
    Jupyter's environment."""
    session = socket_session(short_dir)
    write_token(session)
    script = JupyterLabJob("jupyter_lab", {}).script(context(short_dir / "w", 3, session))
    (short_dir / "w").mkdir()
    prelude = script.split("\nexec ", 1)[0] + '\necho "$JUPYTER_TOKEN"\n'
    out = subprocess.run(["bash", "-c", prelude], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert out.strip() == TOKEN
    assert TOKEN not in script  # the script goes into the workflow's history


@pytest.mark.parametrize("session", [None, SessionEndpoint()])
def test_interactive_jobs_need_a_session(tmp_path, session):
    for job in (JupyterLabJob("jupyter_lab", {}), AppyterJob("appyter", {})):
        with pytest.raises(InvalidRequest):
            job.script(context(tmp_path, 3, session))


async def test_jupyter_connection_none_until_it_answers(short_dir, unix_server):
    job = JupyterLabJob("jupyter_lab", {})
    session = socket_session(short_dir)
    ctx = context(short_dir, 12, session)
    assert await job.connection(ctx, "127.0.0.1") is None  # no token yet
    Path(session.token_file).write_text("not a token\n")
    assert await job.connection(ctx, "127.0.0.1") is None  # not the server's shape
    write_token(session)
    assert await job.connection(ctx, "127.0.0.1") is None  # nothing listening
    unix_server(session, 200, token=TOKEN)
    connection = await job.connection(ctx, "127.0.0.1")
    assert connection is not None
    assert connection.message == "Webserver ready."
    assert connection.proxy_details == {
        "hostname": "127.0.0.1", "path": "/passthrough/127.0.0.1/12/",
        "socket": session.socket_path, "uid": os.geteuid()}
    assert connection.connection_details == {
        "url_domain": "uws.example.org",
        "url_path": f"/passthrough/127.0.0.1/12/lab?token={TOKEN}"}
    # The server wants the token: with another one in the file, it is not ready.
    write_token(session, "f" * 48)
    assert await job.connection(ctx, "127.0.0.1") is None


async def test_jupyter_connection_only_at_the_sessions_own_socket(short_dir, unix_server):
    """A socket of another account, or a link in the socket's place, is never asked."""
    job = JupyterLabJob("jupyter_lab", {})
    real = socket_session(short_dir / "real")
    (short_dir / "real").mkdir()
    unix_server(real, 200)
    write_token(real)
    assert await job.connection(context(short_dir, 12, real), "h") is not None

    # The same server, but the session belongs to another account: not its socket.
    foreign = real.model_copy(update={"owner_uid": os.geteuid() + 4242})
    assert await job.connection(context(short_dir, 12, foreign), "h") is None

    linked = socket_session(short_dir / "linked")
    (short_dir / "linked").mkdir()
    os.symlink(real.socket_path, linked.socket_path)
    write_token(linked)
    assert await job.connection(context(short_dir, 12, linked), "h") is None
    # Nor is a token read through a link.
    (short_dir / "linked" / "token").unlink()
    os.symlink(real.token_file, linked.token_file)
    assert read_token(linked) is None
    assert read_token(real) == TOKEN


@pytest.fixture
def account() -> Iterator[ExternalAccount]:
    yield from throwaway_account()


@pytest.fixture
async def resource_root(account: ExternalAccount) -> AsyncIterator[tuple[LocalResource, Path]]:
    """A multi-user LocalResource and a workspace of ``account``'s, under a directory the
    account can reach."""
    root = traversable_dir("uws-jt-")
    workspace = root / "ws"
    workspace.mkdir(mode=0o700)
    os.chown(workspace, account.uid, account.gid)  # type: ignore[arg-type]
    resource = LocalResource(
        "local", LocalResource.Settings(state_dir=str(root / "local-jobs"),
                                        sessions_dir=str(root / "sessions")),
        storage=None,  # type: ignore[arg-type]  # not used by this resource
        auth=LocalUserAuthentication("local_auth", AccountSettings(accounts="multi_user")),
        passthrough_domain="uws.example.org", parameter_mapping={})
    await resource.prepare()
    try:
        yield resource, workspace
    finally:
        await stop_leftover_jobs(resource, root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
async def test_jupyter_lab_starts_and_answers(resource_root, account):
    resource, workspace = resource_root
    job = JupyterLabJob("jupyter_lab", {})
    workdir = workspace / "job"
    session = await resource.prepare_session(77, account)
    ctx = context(workdir, 77, session, hostname="127.0.0.1")
    request = LaunchRequest(job_id=77, script=job.script(ctx), workdir=str(workdir),
                            account=account)
    began = time.monotonic()
    handle = await resource.launch(request)
    try:
        connection = None
        while connection is None:
            state = await resource.poll(handle)
            log = (workdir / "job.log").read_text() if (workdir / "job.log").exists() else ""
            assert state.status == "running", log
            assert time.monotonic() - began < JUPYTER_START_LIMIT_S, log
            connection = await job.connection(ctx, "127.0.0.1")
            if connection is None:
                await asyncio.sleep(0.5)
        print(f"JupyterLab answered after {time.monotonic() - began:.1f}s")

        token = Path(session.token_file).read_text().strip()
        assert connection.connection_details == {
            "url_domain": "uws.example.org",
            "url_path": f"/passthrough/127.0.0.1/77/lab?token={token}",
        }
        assert connection.proxy_details == {
            "hostname": "127.0.0.1", "path": "/passthrough/127.0.0.1/77/",
            "socket": session.socket_path, "uid": account.uid}
        # Jupyter itself (the script exec'd it) listens on the socket, as the account, for
        # the account alone, and its token is on no command line.
        info = os.lstat(session.socket_path)
        assert stat.S_ISSOCK(info.st_mode)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (account.uid, 0o600)
        assert token.encode() not in Path(f"/proc/{handle['id']}/cmdline").read_bytes()
        url = "http://localhost/passthrough/127.0.0.1/77/api/status"
        transport = httpx.AsyncHTTPTransport(uds=session.socket_path)
        # Separate clients: the first answer sets a login cookie the second must not send.
        async with httpx.AsyncClient(timeout=10, transport=transport) as client:
            assert (await client.get(url, params={"token": token})).status_code == 200
        transport = httpx.AsyncHTTPTransport(uds=session.socket_path)
        async with httpx.AsyncClient(timeout=10, transport=transport) as client:
            assert (await client.get(url)).status_code == 403  # the token is needed
        # Jupyter kept its state out of the user's home.
        assert (workdir / ".jupyter" / "runtime").is_dir()
    finally:
        await resource.stop(handle, 10.0)
    assert (await resource.poll(handle)).status != "running"
    assert not os.path.exists(session.socket_path)
    assert await job.connection(ctx, "127.0.0.1") is None


# --- Appyter ------------------------------------------------------------------------------


def _exec_part(script: str) -> str:
    """What the script ``exec``s: from the last ``exec`` to its end."""
    return script[script.rindex("\nexec ") + 1:]


def _runtime_line(script: str) -> str:
    return next(line for line in script.splitlines() if " run --rm " in line)


def test_appyter_script(tmp_path):
    settings = AppyterJob.Settings(image="reg.example/appyters:1", runtime="podman",
                                   appyter="default.ipynb", python="/opt/py env/bin/python")
    job = AppyterJob("appyter", {"local": settings})
    workdir = tmp_path / "w d"
    session = socket_session(tmp_path / "s s")
    script = job.script(context(workdir, 9, session, hostname="node-2", appyter="my nb.ipynb"))
    assert_valid_bash(script, tmp_path)
    assert script.startswith("#!/bin/bash\n")
    assert f"cd {shlex.quote(str(workdir))}\n" in script
    # The container's port is published on a free port of the job's own loopback...
    assert "\nPORT=$('/opt/py env/bin/python' -c " in script
    assert _runtime_line(script) == (
        'podman run --rm -p "127.0.0.1:$PORT:5000" '
        f"-v {shlex.quote(f'{workdir}:/data')} reg.example/appyters:1 "
        "appyter --prefix /passthrough/node-2/9/ --host 0.0.0.0 --port 5000 'my nb.ipynb' &"
    )
    # ...and the session's socket is served by the bridge, which the script becomes.
    assert shlex.split(_exec_part(script)) == [
        "exec", "/opt/py env/bin/python", "-c", BRIDGE, session.socket_path, "$PORT"]
    assert job.interactive
    assert job.default_time_limit_min("local") == 60


def test_appyter_script_defaults(tmp_path):
    script = AppyterJob("appyter", {}).script(context(tmp_path, 4, socket_session(tmp_path)))
    assert_valid_bash(script, tmp_path)
    assert _runtime_line(script).startswith("podman run --rm")
    assert "maayanlab/appyters:latest appyter --prefix /passthrough/127.0.0.1/4/" in script
    assert f"exec {shlex.quote(sys.executable)} -c " in script


def test_appyter_script_on_a_compute_node_port(tmp_path):
    session = SessionEndpoint(host="node-3", port=8200)
    script = AppyterJob("appyter", {}).script(context(tmp_path, 4, session))
    assert_valid_bash(script, tmp_path)
    assert "\nPORT=8200\n" in script
    assert '-p "127.0.0.1:$PORT:5000"' in _runtime_line(script)
    assert script.rstrip("\n").endswith("\nwait")


# A stand-in for the container runtime: serves HTTP where "-p HOST:PORT:5000" says, and
# answers each GET with the path it was asked for.
FAKE_RUNTIME = """\
import http.server, sys
host, port, _ = sys.argv[sys.argv.index("-p") + 1].split(":")
prefix = sys.argv[sys.argv.index("--prefix") + 1]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("appyter at " + self.path).encode()
        self.send_response(200 if self.path.startswith(prefix) else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer((host, int(port)), Handler).serve_forever()
"""


@pytest.fixture
def fake_runtime(short_dir: Path) -> str:
    path = short_dir / "fake-runtime"
    path.write_text(f"#!{sys.executable}\n{FAKE_RUNTIME}")
    path.chmod(0o755)
    return str(path)


async def _answered(session: SessionEndpoint, path: str) -> httpx.Response | None:
    transport = httpx.AsyncHTTPTransport(uds=session.socket_path)
    try:
        async with httpx.AsyncClient(timeout=5, transport=transport) as client:
            return await client.get(f"http://localhost{path}")
    except httpx.HTTPError:
        return None


async def test_appyter_script_serves_the_session_through_its_bridge(short_dir, fake_runtime):
    """The whole script runs: it picks a port, starts the (stand-in) runtime publishing
    there, and becomes the bridge from the session's socket to that port."""
    sessions = short_dir / "s"
    sessions.mkdir(mode=0o700)
    session = socket_session(sessions)
    job = AppyterJob("appyter", {"local": AppyterJob.Settings(runtime=fake_runtime)})
    workdir = short_dir / "w"
    workdir.mkdir()
    ctx = context(workdir, 9, session, hostname="node-2")
    proc = subprocess.Popen(["bash", "-c", job.script(ctx)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        response = None
        while response is None or response.status_code != 200:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the bridge never answered"
            await asyncio.sleep(0.1)
            response = await _answered(session, "/passthrough/node-2/9/x")
        assert response.text == "appyter at /passthrough/node-2/9/x"
        info = os.lstat(session.socket_path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        # The script became the bridge (exec): the process the resource signals serves it.
        assert b"asyncio.start_unix_server" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        # Many requests at once, each its own connection through the bridge.
        answers = await asyncio.gather(*(_answered(session, f"/passthrough/node-2/9/{i}")
                                         for i in range(10)))
        assert [a.text if a else None for a in answers] == [
            f"appyter at /passthrough/node-2/9/{i}" for i in range(10)]

        connection = await job.connection(ctx, "node-2")
        assert connection is not None
        assert connection.proxy_details == {
            "hostname": "node-2", "path": "/passthrough/node-2/9/",
            "socket": session.socket_path, "uid": os.geteuid()}
        assert connection.connection_details == {
            "url_domain": "uws.example.org", "url_path": "/passthrough/node-2/9/"}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def test_appyter_bridge_with_nothing_behind_it(short_dir):
    """Before the container listens, the bridge accepts and hangs up: not up yet."""
    session = socket_session(short_dir)
    script = AppyterJob("appyter", {}).script(context(short_dir, 4, session))
    bridge = shlex.split(_exec_part(script))
    assert bridge[0] == "exec" and bridge[-1] == "$PORT"
    port = str(free_port())  # nothing listens there
    proc = subprocess.Popen([*bridge[1:-1], port], start_new_session=True)
    try:
        assert await _wait_for(lambda: os.path.exists(session.socket_path))
        assert await _answered(session, "/passthrough/127.0.0.1/4/") is None
        assert await AppyterJob("appyter", {}).connection(
            context(short_dir, 4, session), "127.0.0.1") is None
        assert proc.poll() is None  # and goes on serving
    finally:
        proc.kill()
        proc.wait()


async def _wait_for(check, limit: float = 30.0) -> bool:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.parametrize("status,ready", [(200, True), (302, True), (404, True),
                                          (500, False), (503, False)])
async def test_appyter_connection_by_status(short_dir, unix_server, status, ready):
    # Any answer short of a server error means the Appyter is up (a redirect counts).
    job = AppyterJob("appyter", {})
    session = socket_session(short_dir)
    ctx = context(short_dir, 9, session)
    assert await job.connection(ctx, "node-2") is None  # no socket yet
    unix_server(session, status)
    connection = await job.connection(ctx, "node-2")
    assert (connection is not None) == ready
    foreign = session.model_copy(update={"owner_uid": os.geteuid() + 4242})
    assert await job.connection(context(short_dir, 9, foreign), "node-2") is None


async def test_appyter_connection_on_a_compute_node_port():
    """The compute-node case asks host:port over TCP: an HTTP server there answers."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(404, None))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        session = SessionEndpoint(host="127.0.0.1", port=port)
        connection = await AppyterJob("appyter", {}).connection(
            context(Path("/nonexistent"), 9, session), "node-2")
        assert connection is not None
        assert connection.proxy_details == {
            "hostname": "127.0.0.1", "port": port, "path": "/passthrough/node-2/9/"}
    finally:
        server.shutdown()
        server.server_close()


def test_bash_is_available():
    # The job scripts are bash; the syntax checks above mean nothing without it.
    assert shutil.which("bash")
