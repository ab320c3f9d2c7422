"""An interactive Appyter, run in a container and reached through the passthrough proxy.

The Appyter's web server listens on TCP inside its container, but the passthrough only
ever connects where the resource decided (the session's Unix socket). So the script picks
a free port on the job's own loopback (in multi-user mode the job's network namespace:
nobody else can reach it), runs the container publishing port 5000 there, and ``exec``s a
small bridge that serves the session socket and forwards each connection to that port.
The container runtime must run as the job's account inside its namespace (rootless
``podman``): a root daemon would publish the port on the host, outside the job's reach.
A stop reaches the bridge and the runtime alike: the supervisor signals the whole tree.
"""

from __future__ import annotations

import shlex
from typing import cast

from controllers.base import Connection, JobContext, JobType, JobTypeSettings
from controllers.job_types.jupyter_lab import (
    SESSION_HOST,
    connection_hostname,
    http_status,
    interpreter,
    passthrough_path,
    proxy_details,
    session_hostname,
    session_of,
)

CONTAINER_PORT = 5000
CONTAINER_DATA = "/data"

# Run by the job script: "python -c BRIDGE SOCKET PORT". Binds the socket (mode 0600) and
# pipes bytes both ways between each client and 127.0.0.1:PORT.
_BRIDGE_PY = """\
import asyncio, os, sys
sock, port = sys.argv[1], int(sys.argv[2])
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()
async def serve(cr, cw):
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        cw.close()
        return
    await asyncio.gather(pipe(cr, uw), pipe(ur, cw), return_exceptions=True)
async def main():
    os.umask(0o177)
    server = await asyncio.start_unix_server(serve, sock)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""
# Prints a free port of this (the job's) loopback.
_FREE_PORT_PY = (
    "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
)


class AppyterJob(JobType):
    """An Appyter from a container image, with the job's workdir mounted at ``/data``."""

    interactive = True

    class Settings(JobTypeSettings):
        image: str = "maayanlab/appyters:latest"
        runtime: str = "podman"
        time_limit_min: int | None = 60
        appyter: str = ""
        # Runs the port picker and the bridge; empty means the worker's own interpreter.
        python: str = ""

    def script(self, ctx: JobContext) -> str:
        settings = cast(AppyterJob.Settings, self.settings_for(ctx.resource_name))
        session = session_of(ctx)
        q = shlex.quote
        python = interpreter(settings.python)
        appyter = str(ctx.job_details.get("appyter") or settings.appyter)
        prefix = passthrough_path(session_hostname(ctx), ctx.job_id)
        args = [
            q(settings.runtime), "run", "--rm",
            "-p", f'"{SESSION_HOST}:$PORT:{CONTAINER_PORT}"',
            "-v", q(f"{ctx.workdir}:{CONTAINER_DATA}"),
            q(settings.image),
            # Inside the container it must listen on all interfaces to be published.
            "appyter", "--prefix", q(prefix), "--host", "0.0.0.0", "--port", str(CONTAINER_PORT),
        ]
        if appyter:
            args.append(q(appyter))
        if session.socket_path:
            serve = f"exec {q(python)} -c {q(_BRIDGE_PY)} {q(session.socket_path)} \"$PORT\""
            port = f"PORT=$({q(python)} -c {q(_FREE_PORT_PY)})"
        else:  # a compute node: the container publishes the port the resource chose
            serve = "wait"
            port = f"PORT={session.port}"
        return f"""#!/bin/bash
set -euo pipefail
cd {q(ctx.workdir)}
{port}
{" ".join(args)} &
{serve}
"""

    async def connection(self, ctx: JobContext, hostname: str) -> Connection | None:
        session = session_of(ctx)
        hostname = connection_hostname(session, hostname)
        path = passthrough_path(hostname, ctx.job_id)
        status = await http_status(session, path)
        # Any answer short of a server error means the Appyter is up (a redirect counts).
        if status is None or status >= 500:
            return None
        return Connection(
            message="Webserver ready.",
            proxy_details=proxy_details(session, hostname, ctx.job_id),
            connection_details={"url_domain": ctx.passthrough_domain, "url_path": path},
        )
