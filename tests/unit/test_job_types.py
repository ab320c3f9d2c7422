"""Job types: their scripts, and for the interactive ones, how a session is found.

JupyterLab runs for real through LocalResource; the container runtime Appyter needs is not
on this machine, so its script is only read and syntax-checked.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import shlex
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from controllers.base import ExternalAccount, JobContext, LaunchRequest
from controllers.job_types.appyter import AppyterJob
from controllers.job_types.jupyter_lab import CONNECTION_FILE, JupyterLabJob
from controllers.job_types.local_test import LocalTestJob
from controllers.resources.local import LocalResource

JUPYTER_START_LIMIT_S = 60.0


def context(workdir: Path, job_id: int = 12, **details: str) -> JobContext:
    return JobContext(job_id=job_id, workdir=str(workdir), resource_name="local",
                      passthrough_domain="uws.example.org", job_details=details)


def assert_valid_bash(script: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sh"
    path.write_text(script)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_connection_file(workdir: Path, port: int, token: str = "t0k3n") -> None:
    (workdir / CONNECTION_FILE).write_text(
        json.dumps({"host": "127.0.0.1", "port": port, "token": token}))


# --- local test job -------------------------------------------------------------------


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


# --- JupyterLab -----------------------------------------------------------------------


def test_jupyter_script_is_quoted_valid_bash(tmp_path):
    workdir = tmp_path / "job dir; rm -rf x"
    settings = JupyterLabJob.Settings(python="/opt/py env/bin/python",
                                      extra_args=["--ServerApp.x=a b"])
    job = JupyterLabJob("jupyter_lab", {"local": settings})
    script = job.script(context(workdir, 12, hostname="node-1",
                                workspace_path="/data/ws 1"))
    assert_valid_bash(script, tmp_path)
    assert f"cd {shlex.quote(str(workdir))}\n" in script
    assert "exec '/opt/py env/bin/python' -m jupyter lab" in script
    assert "--ServerApp.base_url=/passthrough/node-1/12/" in script
    assert "'--ServerApp.root_dir=/data/ws 1'" in script
    assert "--port-retries=0" in script
    assert "'--ServerApp.x=a b'" in script
    runtime = shlex.quote(str(workdir / ".jupyter" / "runtime"))
    assert f"export JUPYTER_RUNTIME_DIR={runtime}\n" in script
    assert job.interactive
    assert job.default_time_limit_min("local") == 60


def test_jupyter_script_defaults(tmp_path):
    script = JupyterLabJob("jupyter_lab", {}).script(context(tmp_path, 3))
    assert "--ServerApp.base_url=/passthrough/127.0.0.1/3/" in script
    assert f"--ServerApp.root_dir={tmp_path}" in script


async def test_jupyter_connection_none_until_it_answers(tmp_path):
    job = JupyterLabJob("jupyter_lab", {})
    ctx = context(tmp_path)
    assert await job.connection(ctx, "127.0.0.1") is None  # no connection file yet
    (tmp_path / CONNECTION_FILE).write_text('{"host": "127.0')
    assert await job.connection(ctx, "127.0.0.1") is None  # half-written
    write_connection_file(tmp_path, free_port())
    assert await job.connection(ctx, "127.0.0.1") is None  # nothing listening


@pytest.mark.slow
async def test_jupyter_lab_starts_and_answers(tmp_path):
    resource = LocalResource("local", LocalResource.Settings(), storage=None,  # type: ignore[arg-type]
                             auth=None, passthrough_domain="uws.example.org",  # type: ignore[arg-type]
                             parameter_mapping={})
    job = JupyterLabJob("jupyter_lab", {})
    ctx = context(tmp_path, 77, hostname="127.0.0.1")
    request = LaunchRequest(job_id=77, script=job.script(ctx), workdir=str(tmp_path),
                            account=ExternalAccount(username=getpass.getuser()))
    began = time.monotonic()
    handle = await resource.launch(request)
    try:
        connection = None
        while connection is None:
            state = await resource.poll(handle)
            log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else ""
            assert state.status == "running", log
            assert time.monotonic() - began < JUPYTER_START_LIMIT_S, log
            connection = await job.connection(ctx, "127.0.0.1")
            if connection is None:
                await asyncio.sleep(0.5)
        print(f"JupyterLab answered after {time.monotonic() - began:.1f}s")

        conn = json.loads((tmp_path / CONNECTION_FILE).read_text())
        assert stat.S_IMODE((tmp_path / CONNECTION_FILE).stat().st_mode) == 0o600
        token, port = conn["token"], conn["port"]
        assert connection.connection_details == {
            "url_domain": "uws.example.org",
            "url_path": f"/passthrough/127.0.0.1/77/lab?token={token}",
        }
        assert connection.proxy_details == {
            "hostname": "127.0.0.1", "port": port, "path": "/passthrough/127.0.0.1/77/"}
        url = f"http://127.0.0.1:{port}/passthrough/127.0.0.1/77/api/status"
        # Separate clients: the first answer sets a login cookie the second must not send.
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(url, params={"token": token})).status_code == 200
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(url)).status_code == 403  # the token is needed
        # Jupyter kept its state out of the user's home.
        assert (tmp_path / ".jupyter" / "runtime").is_dir()
    finally:
        await resource.stop(handle, 10.0)
    assert (await resource.poll(handle)).status != "running"
    assert await job.connection(ctx, "127.0.0.1") is None


# --- Appyter --------------------------------------------------------------------------


def test_appyter_script(tmp_path):
    settings = AppyterJob.Settings(image="reg.example/appyters:1", runtime="podman",
                                   appyter="default.ipynb")
    job = AppyterJob("appyter", {"local": settings})
    workdir = tmp_path / "w d"
    script = job.script(context(workdir, 9, hostname="node-2", appyter="my nb.ipynb"))
    assert_valid_bash(script, tmp_path)
    assert script.startswith("#!/bin/bash\n")
    exec_line = next(line for line in script.splitlines() if line.startswith("exec "))
    assert exec_line == (
        'exec podman run --rm -p "127.0.0.1:$PORT:5000" '
        f"-v {shlex.quote(f'{workdir}:/data')} reg.example/appyters:1 "
        "appyter --prefix /passthrough/node-2/9/ --host 0.0.0.0 --port 5000 'my nb.ipynb'"
    )
    assert CONNECTION_FILE in script
    assert job.interactive
    assert job.default_time_limit_min("local") == 60


def test_appyter_script_defaults(tmp_path):
    script = AppyterJob("appyter", {}).script(context(tmp_path, 4))
    assert_valid_bash(script, tmp_path)
    assert "exec docker run --rm" in script
    assert "maayanlab/appyters:latest appyter --prefix /passthrough/127.0.0.1/4/" in script


def test_appyter_port_picking_writes_the_connection_file(tmp_path):
    """The lines before the ``exec`` run for real: they need no container runtime."""
    script = AppyterJob("appyter", {}).script(context(tmp_path, 4))
    prelude = script.split("\nexec ", 1)[0] + '\necho "$PORT"\n'
    out = subprocess.run(["bash", "-c", prelude], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    conn = json.loads((tmp_path / CONNECTION_FILE).read_text())
    assert conn["host"] == "127.0.0.1"
    assert int(out) == conn["port"] > 0
    assert stat.S_IMODE((tmp_path / CONNECTION_FILE).stat().st_mode) == 0o600


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    """A web server answering 404 (under 500: up) to everything; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


async def test_appyter_connection(tmp_path, http_server):
    job = AppyterJob("appyter", {})
    ctx = context(tmp_path, 9)
    assert await job.connection(ctx, "node-2") is None
    write_connection_file(tmp_path, free_port())
    assert await job.connection(ctx, "node-2") is None
    write_connection_file(tmp_path, http_server)
    connection = await job.connection(ctx, "node-2")
    assert connection is not None
    assert connection.proxy_details == {
        "hostname": "127.0.0.1", "port": http_server, "path": "/passthrough/node-2/9/"}
    assert connection.connection_details == {
        "url_domain": "uws.example.org", "url_path": "/passthrough/node-2/9/"}


def test_bash_is_available():
    # The job scripts are bash; the syntax checks above mean nothing without it.
    assert shutil.which("bash")
