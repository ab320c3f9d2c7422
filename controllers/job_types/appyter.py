"""An interactive Appyter, run in a container and reached through the passthrough proxy.

The script picks a free port on this host, records it in ``.uws-connection.json`` and
``exec``s the container runtime, publishing the Appyter's port 5000 on that port of the
loopback interface only (the proxy is the way in). ``exec`` keeps the runtime's client the
job's process, so a stop's SIGTERM reaches it and, through it, the container.
"""

from __future__ import annotations

import shlex
from typing import cast

from controllers.base import Connection, JobContext, JobType, PluginSettings
from controllers.job_types.jupyter_lab import (
    SESSION_HOST,
    connection_lines,
    http_status,
    interpreter,
    passthrough_path,
    proxy_details,
    read_connection_file,
    session_hostname,
)

CONTAINER_PORT = 5000
CONTAINER_DATA = "/data"


class AppyterJob(JobType):
    """An Appyter from a container image, with the job's workdir mounted at ``/data``."""

    interactive = True

    class Settings(PluginSettings):
        image: str = "maayanlab/appyters:latest"
        runtime: str = "docker"
        time_limit_min: int | None = 60
        appyter: str = ""
        # Only picks the free port; empty means the worker's own interpreter.
        python: str = ""

    def script(self, ctx: JobContext) -> str:
        settings = cast(AppyterJob.Settings, self.settings_for(ctx.resource_name))
        q = shlex.quote
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
        return f"""#!/bin/bash
set -euo pipefail
cd {q(ctx.workdir)}
{connection_lines(interpreter(settings.python), ctx.workdir)}\
exec {" ".join(args)}
"""

    async def connection(self, ctx: JobContext, hostname: str) -> Connection | None:
        conn = read_connection_file(ctx.workdir)
        if conn is None:
            return None
        path = passthrough_path(hostname, ctx.job_id)
        status = await http_status(f"http://{conn['host']}:{conn['port']}{path}")
        # Any answer short of a server error means the Appyter is up (a redirect counts).
        if status is None or status >= 500:
            return None
        return Connection(
            message="Webserver ready.",
            proxy_details=proxy_details(conn, hostname, ctx.job_id),
            connection_details={"url_domain": ctx.passthrough_domain, "url_path": path},
        )
