"""An interactive JupyterLab session, reached through the passthrough proxy.

The resource decides where the session listens before launch (a Unix socket in a directory
only the job's account and the service can open, for the local resource) and writes the
session's token into a file there; the script passes it to Jupyter in ``JUPYTER_TOKEN``
(a command line is readable by every account through ``/proc``) and ``exec``s JupyterLab
on that socket, so the resource's signals reach the server directly. ``connection()``
asks the server, at the address the resource chose, whether it answers yet. Nothing the
job writes decides where the passthrough connects.

The helpers for the token and the readiness probe are shared with the Appyter job type.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import stat
import sys
from pathlib import Path
from typing import cast

import httpx
from pydantic import Field

from controllers.base import Connection, JobContext, JobType, JobTypeSettings, SessionEndpoint
from controllers.errors import InvalidRequest

log = logging.getLogger(__name__)

SESSION_HOST = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0
_TOKEN = re.compile(r"^[0-9a-f]{16,128}$")


def session_hostname(ctx: JobContext) -> str:
    """The resource's hostname, the second part of the passthrough path: the one the
    resource fixed with the session's endpoint, if it did."""
    if ctx.session is not None and ctx.session.hostname:
        return ctx.session.hostname
    return str(ctx.job_details.get("hostname") or SESSION_HOST)


def connection_hostname(session: SessionEndpoint, found_on: str) -> str:
    """The passthrough path's host once the job runs: the resource's label for the
    session when it fixed one before launch (the script's base URL uses it), else the
    host the job was found running on."""
    return session.hostname or found_on


def passthrough_path(hostname: str, job_id: int) -> str:
    return f"/passthrough/{hostname}/{job_id}/"


def interpreter(python: str) -> str:
    """The configured interpreter, or the worker's own when none is configured."""
    return python or sys.executable


def runnable_by_others(path: str) -> bool:
    """Whether an account other than ours can execute ``path`` (every directory on the way
    searchable, the file executable by others)."""
    real = Path(os.path.realpath(path))
    try:
        return all(p.stat().st_mode & 0o001 for p in (real, *real.parents))
    except OSError:
        return False


def session_of(ctx: JobContext) -> SessionEndpoint:
    if ctx.session is None or not (ctx.session.socket_path or ctx.session.port):
        raise InvalidRequest("Interactive sessions are not available on this resource.")
    return ctx.session


def token_line(session: SessionEndpoint) -> str:
    """Bash that exports the session's token from the file the server wrote."""
    return f'export JUPYTER_TOKEN="$(cat {shlex.quote(session.token_file)})"\n'


def read_token(session: SessionEndpoint) -> str | None:
    """The session's token as the job can see it (its directory is the job account's, so
    the file is read like any user data: no link followed, a plain small file, the shape
    the server wrote). Only ever shown to the session's owner."""
    try:
        fd = os.open(session.token_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 256:
            return None
        token = os.read(fd, 256).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)
    return token if _TOKEN.match(token) else None


async def http_status(session: SessionEndpoint, path: str,
                      headers: dict[str, str] | None = None) -> int | None:
    """The status a GET of ``path`` on the session answers, or None when nothing answers
    (yet). A Unix socket is opened without following links and must be owned by the job's
    account, then connected through its descriptor, so a swapped name leads nowhere."""
    if not session.socket_path:
        return await _get(f"http://{session.host}:{session.port}{path}", headers, None)
    try:
        fd = os.open(session.socket_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode) or (
                session.owner_uid is not None and info.st_uid != session.owner_uid):
            return None
        transport = httpx.AsyncHTTPTransport(uds=f"/proc/self/fd/{fd}")
        return await _get(f"http://localhost{path}", headers, transport)
    finally:
        os.close(fd)


async def _get(url: str, headers: dict[str, str] | None,
               transport: httpx.AsyncHTTPTransport | None) -> int | None:
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, transport=transport) as client:
            response = await client.get(url, headers=headers)
    except httpx.HTTPError:
        return None
    return response.status_code


def proxy_details(session: SessionEndpoint, hostname: str, job_id: int) -> dict[str, object]:
    """The passthrough's upstream: the resource's choice, stored by the server."""
    details: dict[str, object] = {"hostname": hostname, "path": passthrough_path(hostname, job_id)}
    if session.socket_path:
        details.update(socket=session.socket_path, uid=session.owner_uid)
    else:  # a compute node: the URL's hostname is the node's
        details.update(hostname=session.host, port=session.port)
    return details


class JupyterLabJob(JobType):
    """JupyterLab in the job's workspace, served under its passthrough path."""

    interactive = True

    class Settings(JobTypeSettings):
        python: str = ""
        time_limit_min: int | None = 60
        extra_args: list[str] = Field(default_factory=list)
        # Stop a session nobody has used through the passthrough for this long (off: None).
        idle_timeout_minutes: float | None = Field(default=None, gt=0)

    async def prepare(self) -> None:
        # As root, jobs run as their owners' accounts: they must be able to run Python.
        if os.geteuid() != 0:
            return
        for resource in ("", *self.settings_by_resource):
            python = interpreter(cast(JupyterLabJob.Settings,
                                      self.settings_for(resource)).python)
            if not runnable_by_others(python):
                log.warning("job accounts cannot run %s (a directory on its path is not "
                            "searchable by others): set %s's python to an interpreter every "
                            "account can run", python, self.name)

    def script(self, ctx: JobContext) -> str:
        settings = cast(JupyterLabJob.Settings, self.settings_for(ctx.resource_name))
        session = session_of(ctx)
        python = interpreter(settings.python)
        q = shlex.quote
        state = os.path.join(ctx.workdir, ".jupyter")
        root_dir = str(ctx.job_details.get("workspace_path") or ctx.workdir)
        if session.socket_path:
            listen = [q(f"--ServerApp.sock={session.socket_path}"), "--ServerApp.sock_mode=0600"]
        else:
            listen = [q(f"--ip={session.host}"), f"--port={session.port}", "--port-retries=0"]
        args = [
            "--no-browser", *listen,
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
export JUPYTER_RUNTIME_DIR={q(os.path.join(state, "runtime"))}
export JUPYTER_CONFIG_DIR={q(os.path.join(state, "config"))}
export JUPYTER_DATA_DIR={q(os.path.join(state, "data"))}
export IPYTHONDIR={q(os.path.join(state, "ipython"))}
mkdir -p "$JUPYTER_RUNTIME_DIR" "$JUPYTER_CONFIG_DIR" "$JUPYTER_DATA_DIR" "$IPYTHONDIR"
{token_line(session)}\
exec {q(python)} -m jupyter lab \\
    {continued}
"""

    async def connection(self, ctx: JobContext, hostname: str) -> Connection | None:
        session = session_of(ctx)
        hostname = connection_hostname(session, hostname)
        token = read_token(session)
        if token is None:
            return None
        path = passthrough_path(hostname, ctx.job_id)
        if await http_status(session, f"{path}api/status",
                             {"Authorization": f"token {token}"}) != 200:
            return None
        return Connection(
            message="Webserver ready.",
            proxy_details=proxy_details(session, hostname, ctx.job_id),
            connection_details={"url_domain": ctx.passthrough_domain,
                                "url_path": f"{path}lab?token={token}"},
        )
