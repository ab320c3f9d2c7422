"""Run job scripts as supervised process trees on this machine.

Every fact the worker acts on is server state, kept in ``<state_dir>/<job id>/`` (the
service's own, mode 0700) and in the handle the workflow keeps: the supervisor's pid and
start ticks, the job's pid, the CPUs granted, the start and end times measured by the
supervisor and its ``waitpid`` exit code (``supervisor.py``). Nothing in the workspace or
the job's directory, which the job's account owns and may rewrite at will, is read back.

In multi-user mode each job runs as its owner's account (never root, never the service
account) in network and mount namespaces of its own, so it cannot connect to the control plane's
loopback services (PostgreSQL, Temporal, the API's metrics) nor to the Unix sockets in
``hidden_paths`` (PostgreSQL's socket directory by default); an interactive session is
reached through a Unix socket in ``<sessions_dir>/<job id>/``, a directory only the job's
account and the service can open. A host that cannot make network namespaces refuses to
start: jobs are never run unisolated. In personal mode (one person, the server's own
account) jobs run as that account, unconfined: it is theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from controllers.base import (
    ComputeResource,
    Health,
    JobState,
    LaunchRequest,
    PluginSettings,
    SessionEndpoint,
)
from controllers.errors import BackendError
from controllers.resources.local.launcher import (
    DEFAULT_PATH,
    SUPERVISOR,
    LauncherError,
    launcher_for,
    log_tail,
)
from controllers.resources.local.procfs import is_alive, kill_group_if_ours, kill_if_ours
from controllers.resources.session_dir import SESSION_SOCKET, SESSION_TOKEN, make_session_dir
from core.status import ResourceStatus
from core.values import ExternalAccount

log = logging.getLogger(__name__)

SPEC, STARTED, ENDED = "spec.json", "started.json", "ended.json"
LAUNCH_LOCK, SUPERVISOR_LOCK, SUPERVISOR_LOG = "launch.lock", "supervisor.lock", "supervisor.log"
# A Unix socket's path must fit sockaddr_un (108 bytes with its NUL).
MAX_SOCKET_PATH = 107

# How long launch waits for the supervisor's started.json.
START_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.02
FALLBACK_POLL_S = 0.5
# A stop waits this long past the grace period for the supervisor to finish.
STOP_SLACK_S = 5.0

_NO_NETNS = ("multi-user local jobs run in network namespaces of their own, and this host "
             "cannot make one ({reason}); run the worker as root on a Linux kernel with "
             "network namespaces, or use personal mode. Jobs are never run unisolated.")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_private(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, path)


def _private_dir(path: Path, mode: int) -> None:
    """A directory of the service's with exactly ``mode`` (never through a link)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


class LocalResource(ComputeResource):
    """Runs each job as a supervised process tree on this machine."""

    class Settings(PluginSettings):
        hostname: str = "127.0.0.1"
        shell: str = "/bin/bash"
        stop_grace_seconds: float = 10.0
        # The service's own directories; relative paths are under UWS_DATA_DIR.
        state_dir: str = "local-jobs"
        sessions_dir: str = "sessions"
        # Directories of the control plane's Unix sockets, hidden from isolated jobs (a
        # network namespace does not cover those); add any other local service's.
        hidden_paths: list[str] = ["/run/postgresql", "/var/run/postgresql"]

    settings: Settings

    @property
    def isolated(self) -> bool:
        """Jobs of many people: each as its own account, in its own network namespace."""
        return not self.auth.serves_one_person

    @property
    def _state_root(self) -> Path:
        return Path(self.settings.state_dir)

    @property
    def _sessions_root(self) -> Path:
        return Path(self.settings.sessions_dir)

    async def prepare(self) -> None:
        await asyncio.to_thread(self._prepare)

    def _ensure_roots(self) -> None:
        for parent in {self._state_root.parent, self._sessions_root.parent}:
            parent.mkdir(parents=True, exist_ok=True)
        _private_dir(self._state_root, 0o700)
        _private_dir(self._sessions_root, 0o711)  # traversable: each session's dir is 0700

    def _prepare(self) -> None:
        self._ensure_roots()
        longest = len(str(self._sessions_root / ("9" * 12) / SESSION_SOCKET))
        if longest > MAX_SOCKET_PATH:
            raise RuntimeError(f"sessions_dir {self._sessions_root} is too long for a Unix "
                               f"socket path ({longest} > {MAX_SOCKET_PATH} bytes)")
        if self.isolated:
            reason = _network_namespace_problem()
            if reason:
                raise RuntimeError(_NO_NETNS.format(reason=reason))

    async def health(self) -> Health:
        if self.isolated:
            reason = await asyncio.to_thread(_network_namespace_problem)
            if reason:
                return Health(ok=False, detail=_NO_NETNS.format(reason=reason))
        return Health(ok=True)

    # sessions ----------------------------------------------------------------------------

    def session_endpoint(self, job_id: int, account: ExternalAccount) -> SessionEndpoint:
        directory = self._sessions_root / str(job_id)
        return SessionEndpoint(socket_path=str(directory / SESSION_SOCKET),
                               token_file=str(directory / SESSION_TOKEN),
                               owner_uid=self._run_as(account)[0])

    async def prepare_session(self, job_id: int, account: ExternalAccount) -> SessionEndpoint:
        endpoint = self.session_endpoint(job_id, account)
        await asyncio.to_thread(self._make_session_dir, job_id, account)
        return endpoint

    def _make_session_dir(self, job_id: int, account: ExternalAccount) -> None:
        uid, gid, _ = self._run_as(account)
        self._ensure_roots()
        make_session_dir(self._sessions_root / str(job_id), uid, gid)

    def _remove_session_dir(self, job_id: int) -> None:
        shutil.rmtree(self._sessions_root / str(job_id), ignore_errors=True)

    # launch ------------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        # Blocking work (a file lock, short waits) runs in a thread; the lock makes two
        # concurrent launches of one job (a retried activity) start a single process.
        return await asyncio.to_thread(self._launch_locked, request)

    def _launch_locked(self, request: LaunchRequest) -> dict[str, Any]:
        state = self._state_root / str(request.job_id)
        self._ensure_roots()  # prepare() made them, unless something removed them since
        _private_dir(state, 0o700)
        with _launch_lock(state):
            return self._launch(request, state)

    def _launch(self, request: LaunchRequest, state: Path) -> dict[str, Any]:
        started = _read_json(state / STARTED)
        if started is None and (state / SPEC).exists() and _supervisor_running(state):
            # A launch that died right after starting the supervisor: adopt what it started.
            started = self._wait_started(state)
        if started is not None:
            spec = _read_json(state / SPEC) or {}
            return self._handle(request, state, started, int(spec.get("cpus", 1)))
        cpus = self._num_cpus(request.resource_options)
        uid, gid, switch = self._run_as(request.account)
        spec = {
            "job_id": request.job_id, "cpus": cpus, "uid": uid, "gid": gid,
            "username": request.account.username, "switch_user": switch,
            "workdir": str(Path(request.workdir)), "script": request.script,
            "shell": self.settings.shell, "env": self._environment(request),
            "isolate_network": self.isolated, "hidden_paths": self.settings.hidden_paths,
            "stop_grace_seconds": self.settings.stop_grace_seconds,
        }
        with contextlib.suppress(FileNotFoundError):
            (state / ENDED).unlink()
        _write_private(state / SPEC, json.dumps(spec))
        self._start_supervisor(request.job_id, state)
        started = self._wait_started(state)
        if started is None:
            raise BackendError(
                "The job could not be started.",
                log_message=f"job {request.job_id}: no {STARTED} in {state} after "
                f"{START_TIMEOUT_S}s; supervisor output: {log_tail(state / SUPERVISOR_LOG)!r}",
            )
        return self._handle(request, state, started, cpus)

    def _run_as(self, account: ExternalAccount) -> tuple[int, int, bool]:
        """(uid, gid, switch?) for the job. Multi-user: the owner's account, and never
        root or the service's own. Personal: the service's account, which is the owner's."""
        me = os.geteuid()
        if not self.isolated:
            return me, os.getegid(), False
        uid, gid = account.uid, account.gid
        if uid is None or uid == 0 or uid == me:
            raise BackendError(
                "The job cannot run: its owner has no account of their own on this server.",
                log_message=f"refused to run a job of {account.username!r} as uid {uid}",
            )
        if gid is None or gid == 0:
            raise BackendError("The job cannot run: its owner's account has no group.",
                               log_message=f"refused gid {gid} for {account.username!r}")
        return uid, gid, True

    def _num_cpus(self, options: Mapping[str, Any]) -> int:
        return self.whole_option(options, "num_cpus", 1) or 1

    def _environment(self, request: LaunchRequest) -> dict[str, str]:
        account = request.account
        home = account.home or request.workdir
        env = {"PATH": DEFAULT_PATH, **request.env}
        env.update(HOME=home, USER=account.username, LOGNAME=account.username,
                   UWS_JOB_ID=str(request.job_id))
        return env

    def _start_supervisor(self, job_id: int, state: Path) -> None:
        """Have this worker's launcher fork the job's supervisor (in a session of its own,
        never our child), and wait until it has recorded the start."""
        try:
            answer = launcher_for(self._state_root).start(job_id, START_TIMEOUT_S)
        except (LauncherError, OSError) as exc:
            raise BackendError("The job could not be started.",
                               log_message=f"job {job_id}: {exc}") from None
        if answer not in ("started", "another"):  # another: that job's supervisor runs
            raise BackendError("The job could not be started.",
                               log_message=f"job {job_id}: the supervisor ended without "
                               f"starting it: {log_tail(state / SUPERVISOR_LOG)!r}")

    @staticmethod
    def _wait_started(state: Path) -> dict[str, Any] | None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            started = _read_json(state / STARTED)
            if started is not None or time.monotonic() >= deadline:
                return started
            time.sleep(POLL_INTERVAL_S)

    def _handle(self, request: LaunchRequest, state: Path, started: Mapping[str, Any],
                cpus: int) -> dict[str, Any]:
        return {
            "id": int(started["job_pid"]), "pgid": int(started["job_pid"]),
            "job_ticks": started.get("job_ticks"),
            "supervisor_pid": int(started["supervisor_pid"]),
            "supervisor_ticks": started.get("supervisor_ticks"),
            "state_dir": str(state), "workdir": request.workdir, "job_id": request.job_id,
            "cpus": cpus, "hostname": self.settings.hostname,
            "started_at": float(started["started_at"]),
        }

    async def abandon(self, job_id: int, workdir: str, account: ExternalAccount) -> float:
        state = self._state_root / str(job_id)
        if not state.is_dir():
            return 0.0
        # Under the launch lock: a launch still running in a thread finishes first.
        started = await asyncio.to_thread(self._started_under_lock, state)
        if started is None:
            return 0.0
        spec = _read_json(state / SPEC) or {}
        request = LaunchRequest(job_id=job_id, script="", workdir=workdir, account=account)
        handle = self._handle(request, state, started, int(spec.get("cpus", 1)))
        await self.stop(handle, 0.0)
        return (await self.poll(handle)).core_hours or 0.0

    @staticmethod
    def _started_under_lock(state: Path) -> dict[str, Any] | None:
        with _launch_lock(state):
            return _read_json(state / STARTED)

    # poll / wait -------------------------------------------------------------------------

    async def poll(self, handle: Mapping[str, Any]) -> JobState:
        return await asyncio.to_thread(self._state, handle)

    def _state(self, handle: Mapping[str, Any]) -> JobState:
        if not handle.get("state_dir"):  # launched before supervised jobs existed
            return JobState(status=ResourceStatus.failed,
                            detail="launched by an older version of uws")
        ended_path = Path(handle["state_dir"]) / ENDED
        ended = _read_json(ended_path)
        if ended is None:
            if is_alive(int(handle["supervisor_pid"]), handle.get("supervisor_ticks")):
                return self._job_state(handle, ResourceStatus.running)
            ended = _read_json(ended_path)  # written just before the supervisor exits
        if ended is None:
            # The supervisor was killed: make sure nothing of the job goes on without it.
            kill_group_if_ours(int(handle["pgid"]), handle.get("job_ticks"), signal.SIGKILL)
            self._remove_session_dir(int(handle["job_id"]))
            return self._job_state(handle, ResourceStatus.failed,
                                   "the job's supervisor ended without recording its end")
        self._remove_session_dir(int(handle["job_id"]))
        code, end = int(ended.get("code", 127)), float(ended.get("ended_at", time.time()))
        if code == 0:
            return self._job_state(handle, ResourceStatus.complete, exit_code=0, end=end)
        detail = str(ended.get("detail") or f"exit code {code}")
        return self._job_state(handle, ResourceStatus.failed, detail, exit_code=code, end=end)

    def _job_state(self, handle: Mapping[str, Any], status: str, detail: str = "", *,
                   exit_code: int | None = None, end: float | None = None) -> JobState:
        # Server-measured times and the CPUs the server granted: never negative.
        elapsed = max(0.0, (end or time.time()) - float(handle["started_at"]))
        return JobState(
            status=status, detail=detail, exit_code=exit_code,
            hostname=self.settings.hostname,
            core_hours=max(1, int(handle.get("cpus", 1))) * elapsed / 3600,
        )

    # ``timeout`` is the name the ComputeResource contract gives this parameter.
    async def wait(self, handle: Mapping[str, Any], timeout: float) -> JobState:
        if handle.get("supervisor_pid"):
            await _wait_exit(int(handle["supervisor_pid"]), handle.get("supervisor_ticks"),
                             timeout)
        return await self.poll(handle)

    # stop --------------------------------------------------------------------------------

    async def stop(self, handle: Mapping[str, Any], grace_seconds: float) -> None:
        if not handle.get("state_dir"):
            return
        state = Path(handle["state_dir"])
        supervisor, ticks = int(handle["supervisor_pid"]), handle.get("supervisor_ticks")
        if not (state / ENDED).exists() and is_alive(supervisor, ticks):
            kill_if_ours(supervisor, ticks, signal.SIGTERM)  # it stops the whole tree
            grace = max(grace_seconds, self.settings.stop_grace_seconds)
            if not await _wait_exit(supervisor, ticks, grace + STOP_SLACK_S):
                kill_if_ours(supervisor, ticks, signal.SIGKILL)
        kill_group_if_ours(int(handle["pgid"]), handle.get("job_ticks"), signal.SIGKILL)
        await asyncio.to_thread(self._remove_session_dir, int(handle["job_id"]))


@contextlib.contextmanager
def _launch_lock(state: Path) -> Iterator[None]:
    """The job's launch lock: one launch (or abandon) of a job at a time."""
    lock = os.open(state / LAUNCH_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # releases the lock


def _supervisor_running(state: Path) -> bool:
    """Whether a supervisor holds this job's lock (it does for its whole life)."""
    try:
        fd = os.open(state / SUPERVISOR_LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _network_namespace_problem() -> str:
    """Why this process cannot make a network namespace, or "" when it can."""
    try:
        done = subprocess.run([sys.executable, "-I", "-S", SUPERVISOR, "--check"],
                              capture_output=True, timeout=10, env={"PATH": DEFAULT_PATH})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return ""
    return done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}"


async def _wait_exit(pid: int, start_ticks: int | None, seconds: float) -> bool:
    """Wait until the process ends or ``seconds`` pass; True if it ended.

    A pidfd becomes readable when the process exits, child of ours or not (Linux >= 5.3),
    so the event loop is told of the exit instead of us polling for it."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return True
        return await _sleep_until_exit(pid, start_ticks, seconds)
    try:
        # Checked only now: the pidfd refers to whatever had the pid when it was opened.
        if not is_alive(pid, start_ticks):
            return True
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
        try:
            await asyncio.wait({exited}, timeout=seconds)
        finally:
            loop.remove_reader(fd)
        return exited.done()
    finally:
        os.close(fd)


async def _sleep_until_exit(pid: int, start_ticks: int | None, seconds: float) -> bool:
    """Fallback where pidfds are missing (old kernels, seccomp): look twice a second."""
    deadline = time.monotonic() + seconds
    while is_alive(pid, start_ticks):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(FALLBACK_POLL_S, remaining))
    return True
