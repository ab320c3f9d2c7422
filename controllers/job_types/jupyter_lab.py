"""An interactive JupyterLab session, reached through the passthrough proxy.

The script picks a free port and a token, records them in ``.uws-connection.json`` (mode
0600: the token is the session's only key) and ``exec``s JupyterLab, so the resource's
signals reach the server directly. ``connection()`` reads that file and asks the server
whether it answers yet.

The helpers for the connection file and the readiness probe are shared with the Appyter
job type.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import httpx
from pydantic import Field

from controllers.base import Connection, JobContext, JobType, PluginSettings

CONNECTION_FILE = ".uws-connection.json"
SESSION_HOST = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0

# Run by the job script: bind port 0 to learn a free port, make a token, write the
# connection file atomically and private, print "<port> <token>" for the shell to read.
_CONNECTION_PY = """\
import json, os, secrets, socket, sys
host, path = sys.argv[1], sys.argv[2]
with socket.socket() as s:
    s.bind((host, 0))
    port = s.getsockname()[1]
token = secrets.token_hex(24)
tmp = path + ".tmp"
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
os.fchmod(fd, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump({"host": host, "port": port, "token": token}, f)
os.replace(tmp, path)
print(port, token)
"""


def session_hostname(ctx: JobContext) -> str:
    """The resource's hostname, the second part of the passthrough path."""
    return str(ctx.job_details.get("hostname") or SESSION_HOST)


def passthrough_path(hostname: str, job_id: int) -> str:
    return f"/passthrough/{hostname}/{job_id}/"


def interpreter(python: str) -> str:
    """The configured interpreter, or the worker's own when none is configured."""
    return python or sys.executable


def connection_lines(python: str, workdir: str) -> str:
    """Bash that sets ``PORT`` and ``TOKEN`` and writes the connection file."""
    q = shlex.quote
    path = str(Path(workdir) / CONNECTION_FILE)
    return (
        f"conn=$({q(python)} -c {q(_CONNECTION_PY)} {SESSION_HOST} {q(path)})\n"
        'PORT=${conn%% *}\n'
        'TOKEN=${conn#* }\n'
    )


def read_connection_file(workdir: str) -> dict[str, Any] | None:
    """Host, port and token of the session, or None while the script has not written them
    (or the file is not what the script writes)."""
    try:
        data = json.loads((Path(workdir) / CONNECTION_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("port"), int):
        return None
    if not isinstance(data.get("host"), str):
        return None
    return data


async def http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    """The status a GET of ``url`` answers, or None when nothing answers (yet)."""
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            response = await client.get(url, headers=headers)
    except httpx.HTTPError:
        return None
    return response.status_code


def proxy_details(conn: Mapping[str, Any], hostname: str, job_id: int) -> dict[str, Any]:
    return {"hostname": conn["host"], "port": conn["port"],
            "path": passthrough_path(hostname, job_id)}


class JupyterLabJob(JobType):
    """JupyterLab in the job's workspace, served under its passthrough path."""

    interactive = True

    class Settings(PluginSettings):
        python: str = ""
        time_limit_min: int | None = 60
        extra_args: list[str] = Field(default_factory=list)
        # Stop a session nobody has used through the passthrough for this long (off: None).
        idle_timeout_minutes: float | None = Field(default=None, gt=0)

    def script(self, ctx: JobContext) -> str:
        settings = cast(JupyterLabJob.Settings, self.settings_for(ctx.resource_name))
        python = interpreter(settings.python)
        q = shlex.quote
        state = Path(ctx.workdir) / ".jupyter"
        root_dir = str(ctx.job_details.get("workspace_path") or ctx.workdir)
        args = [
            "--no-browser", f"--ip={SESSION_HOST}", '--port="$PORT"', "--port-retries=0",
            '--ServerApp.token="$TOKEN"',
            q(f"--ServerApp.base_url={passthrough_path(session_hostname(ctx), ctx.job_id)}"),
            q(f"--ServerApp.root_dir={root_dir}"),
            "--ServerApp.allow_remote_access=True", "--ServerApp.trust_xheaders=True",
            *(q(arg) for arg in settings.extra_args),
        ]
        continued = " \\\n    ".join(args)
        # Jupyter's state goes under the workdir so nothing touches the user's home.
        return f"""#!/bin/bash
set -euo pipefail
cd {q(ctx.workdir)}
export JUPYTER_RUNTIME_DIR={q(str(state / "runtime"))}
export JUPYTER_CONFIG_DIR={q(str(state / "config"))}
export JUPYTER_DATA_DIR={q(str(state / "data"))}
export IPYTHONDIR={q(str(state / "ipython"))}
mkdir -p "$JUPYTER_RUNTIME_DIR" "$JUPYTER_CONFIG_DIR" "$JUPYTER_DATA_DIR" "$IPYTHONDIR"
{connection_lines(python, ctx.workdir)}\
# Jupyter refuses to run as root unless told; whom a job runs as is the resource's call.
as_root=()
if [ "$(id -u)" -eq 0 ]; then as_root=(--allow-root); fi
exec {q(python)} -m jupyter lab "${{as_root[@]}}" \\
    {continued}
"""

    async def connection(self, ctx: JobContext, hostname: str) -> Connection | None:
        conn = read_connection_file(ctx.workdir)
        if conn is None:
            return None
        path = passthrough_path(hostname, ctx.job_id)
        url = f"http://{conn['host']}:{conn['port']}{path}api/status"
        token = str(conn.get("token", ""))
        if await http_status(url, {"Authorization": f"token {token}"}) != 200:
            return None
        return Connection(
            message="Webserver ready.",
            proxy_details=proxy_details(conn, hostname, ctx.job_id),
            connection_details={"url_domain": ctx.passthrough_domain,
                                "url_path": f"{path}lab?token={token}"},
        )
