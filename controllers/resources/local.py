"""Run job scripts as detached processes on this machine.

Everything the resource knows of a job lives in files under the job's workdir, so a worker
that restarts (or is SIGKILLed) finds its jobs again from the handle alone:

``job.sh``           the job's script, run with stdout+stderr to ``job.log``
``.uws-run.sh``      the wrapper: records its pid, runs ``job.sh``, records the exit code
``.uws-run.log``     the wrapper's own output (errors of the user switch, say)
``.uws-pid``         the wrapper's pid, written atomically by the wrapper itself
``.uws-exit``        the job's exit code, written atomically by the wrapper at the end
``.uws-launch.json`` the handle, written atomically once the wrapper is known to run

The wrapper is started in its own session (``setsid -f``), so it is the leader of a process
group whose id is its pid, is reparented to init at once and never becomes a zombie child
of the worker, and shares nothing with the worker that a signal to the worker could reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from controllers.base import (
    ComputeResource,
    ExternalAccount,
    Health,
    JobState,
    LaunchRequest,
    PluginSettings,
)
from controllers.errors import BackendError, InvalidRequest

log = logging.getLogger(__name__)

JOB_SCRIPT = "job.sh"
JOB_LOG = "job.log"
WRAPPER = ".uws-run.sh"
WRAPPER_LOG = ".uws-run.log"
PID_FILE = ".uws-pid"
EXIT_FILE = ".uws-exit"
LAUNCH_RECORD = ".uws-launch.json"
LAUNCH_LOCK = ".uws-launch.lock"

# How long launch waits for the wrapper to write its pid, and wait() for the exit file.
PID_TIMEOUT_S = 5.0
EXIT_FILE_TIMEOUT_S = 1.0
POLL_INTERVAL_S = 0.05
FALLBACK_POLL_S = 0.5

# A PATH for jobs: the worker's own environment is not passed on, it may hold credentials.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Marker lines in the wrapper, so a relaunch can tell whose wrapper left a pid file behind
# (and with how many cpus) when the launch that started it died before writing the record.
MARKER = "# uws-"


# --- /proc helpers ----------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (index 0 is the state), or None if there is no such
    process. The command name (field 2) may hold spaces and parentheses, hence rpartition."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw.rpartition(")")[2].split()


def _start_ticks(pid: int) -> int | None:
    """Field 22 (start time in clock ticks since boot): with the pid it names one process."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _is_alive(pid: int, start_ticks: int | None) -> bool:
    """Whether ``pid`` is still the process we started, and not merely an unreaped zombie."""
    fields = _proc_stat(pid)
    if fields is None or start_ticks is None:
        return False
    return fields[0] not in ("Z", "X") and int(fields[19]) == start_ticks


def _is_reused(pid: int, start_ticks: int | None) -> bool:
    """Whether ``pid`` now names another process than ours (so signalling it would hit a
    stranger). The kernel never hands out a pid still used as a process-group id, so while
    any member of our group lives, this is False."""
    ticks = _start_ticks(pid)
    return ticks is not None and ticks != start_ticks


def _descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start_ticks) of every descendant of ``root``, found through parent pids.

    Some children leave the process group on purpose (Jupyter starts kernels in sessions
    of their own); listing them before the stop lets us kill them after it."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    found: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


# --- file helpers -----------------------------------------------------------------------


def _write_atomic(
    path: Path, data: str, mode: int = 0o644, owner: tuple[int, int] | None = None,
) -> None:
    """Write via a fresh temporary file and rename: readers never see a partial file, and
    as root we never write through a symlink the account may have planted at ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_record(workdir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((workdir / LAUNCH_RECORD).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _wrapper_markers(workdir: Path) -> dict[str, int]:
    """The ``# uws-<key>: <int>`` lines of the wrapper in ``workdir`` (job id, cpus)."""
    try:
        lines = (workdir / WRAPPER).read_text().splitlines()
    except FileNotFoundError:
        return {}
    markers: dict[str, int] = {}
    for line in lines:
        key, sep, value = line.removeprefix(MARKER).partition(": ")
        if line.startswith(MARKER) and sep:
            with contextlib.suppress(ValueError):
                markers[key] = int(value)
    return markers


def _open_nofollow(path: Path, flags: int) -> int:
    """Open a file of the workdir without following a symlink there: the account owns the
    directory and could point any name at a file only root may write."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def _runs_other_program(pid: int, workdir: Path) -> bool:
    """Whether ``pid`` is a live process that is not the wrapper of ``workdir``. The pid
    file is in a directory the account controls, and we send signals (maybe as root) to
    whatever it names. A process that already ended (a zombie has no command line) is no
    concern: it never reads as running."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return str(workdir / WRAPPER).encode() not in argv


def _wrapper_script(job_id: int, cpus: int, workdir: Path, shell: str) -> str:
    """The wrapper. It is the pid of the handle, so it must outlive the job and record the
    job's exit code even when a stop TERMs the whole group (then it records 128+15)."""
    q = shlex.quote
    return f"""#!{shell}
{MARKER}job-id: {job_id}
{MARKER}cpus: {cpus}
cd {q(str(workdir))} || exit 1
signalled=
interrupted=
child=
on_signal() {{
    signalled=$((128 + $1))
    interrupted=1
    [ -n "$child" ] && kill -"$1" "$child" 2>/dev/null
}}
# Trapped before the pid is published: whoever can read the pid gets an exit code.
trap 'on_signal 15' TERM
trap 'on_signal 2' INT
trap 'on_signal 1' HUP
echo $$ > {PID_FILE}.tmp && mv -f {PID_FILE}.tmp {PID_FILE}
if [ -z "$signalled" ]; then
    {q(shell)} ./{JOB_SCRIPT} > {JOB_LOG} 2>&1 < /dev/null &
    child=$!
    # A trapped signal makes wait return early: wait again until the job itself ended.
    while :; do
        interrupted=
        wait "$child"
        code=$?
        [ -n "$interrupted" ] || break
    done
fi
[ -n "$signalled" ] && code=$signalled
echo "$code" > {EXIT_FILE}.tmp && mv -f {EXIT_FILE}.tmp {EXIT_FILE}
exit "$code"
"""


# --- the resource -----------------------------------------------------------------------


class LocalResource(ComputeResource):
    """Runs each job as a detached process tree on this machine."""

    class Settings(PluginSettings):
        hostname: str = "127.0.0.1"
        shell: str = "/bin/bash"
        stop_grace_seconds: float = 10.0

    settings: Settings

    async def health(self) -> Health:
        # Without setsid no job can be started detached; everything else is the kernel's.
        if shutil.which("setsid") is None:
            return Health(ok=False, detail="setsid (util-linux) is not on PATH")
        return Health(ok=True)

    # launch ------------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        # Blocking work (a file lock, a few short sleeps) runs in a thread; the lock makes
        # two concurrent launches of one job (a retried activity) start a single process.
        return await asyncio.to_thread(self._launch_locked, request)

    def _launch_locked(self, request: LaunchRequest) -> dict[str, Any]:
        workdir = Path(request.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        lock = _open_nofollow(workdir / LAUNCH_LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._launch(request, workdir)
        finally:
            os.close(lock)  # releases the lock

    def _launch(self, request: LaunchRequest, workdir: Path) -> dict[str, Any]:
        existing = self._find_existing(request.job_id, workdir)
        if existing is not None:
            return existing
        cpus = self._num_cpus(request.resource_options)
        owner = self._switch_to(request.account)
        self._clear_state(workdir)
        _write_atomic(workdir / JOB_SCRIPT, request.script, 0o700, owner)
        wrapper = _wrapper_script(request.job_id, cpus, workdir, self.settings.shell)
        _write_atomic(workdir / WRAPPER, wrapper, 0o700, owner)
        if owner is not None:
            os.chown(workdir, *owner)
        self._start_wrapper(request, workdir, owner)
        pid = self._wait_for_pid(workdir)
        if pid is None:
            raise BackendError(
                "The job could not be started.",
                log_message=f"job {request.job_id}: no pid file in {workdir} after "
                f"{PID_TIMEOUT_S}s; wrapper output: {self._wrapper_output(workdir)!r}",
            )
        return self._record(request.job_id, workdir, pid, cpus)

    def _find_existing(self, job_id: int, workdir: Path) -> dict[str, Any] | None:
        """The handle of this job if an earlier launch got as far as starting it."""
        record = _read_record(workdir)
        if record is not None:
            if record.get("job_id") == job_id:
                return record
            if _is_alive(int(record["id"]), record.get("start_ticks")):
                raise BackendError(
                    "The job's directory is in use by another job.",
                    log_message=f"{workdir} still runs job {record.get('job_id')}",
                )
            return None
        markers = _wrapper_markers(workdir)
        if markers.get("job-id") != job_id:
            return None
        # A launch of this job died between writing the wrapper and writing the record:
        # adopt what it started. Its wrapper may not have written the pid yet, so wait a
        # little; if none appears, the wrapper never ran and the caller launches afresh.
        pid = _read_int(workdir / PID_FILE) or self._wait_for_pid(workdir)
        if pid is None:
            return None
        return self._record(job_id, workdir, pid, markers.get("cpus", 1))

    def _num_cpus(self, options: Mapping[str, Any]) -> int:
        key = self.parameter_mapping.get("num_cpus", "num_cpus")
        value = options.get(key, 1)
        try:
            cpus = int(value)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{key} must be a whole number, not {value!r}.") from None
        if cpus < 1:
            raise InvalidRequest(f"{key} must be at least 1.")
        return cpus

    @staticmethod
    def _switch_to(account: ExternalAccount) -> tuple[int, int] | None:
        """(uid, gid) to run as, or None to run as ourselves. Only root can switch; a
        worker that is not root runs every job as itself."""
        uid = account.uid
        if uid is None or uid == os.geteuid():
            return None
        if os.geteuid() != 0:
            log.warning("not root: job for %s runs as uid %d", account.username, os.geteuid())
            return None
        gid = account.gid
        if gid is None:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
        return uid, gid

    @staticmethod
    def _clear_state(workdir: Path) -> None:
        """Remove what an earlier, ended job left in this directory: a stale exit file
        would make the new job read as ended."""
        for name in (PID_FILE, EXIT_FILE, LAUNCH_RECORD):
            with contextlib.suppress(FileNotFoundError):
                (workdir / name).unlink()

    def _environment(self, request: LaunchRequest) -> dict[str, str]:
        account = request.account
        home = account.home
        if home is None:
            try:
                home = pwd.getpwnam(account.username).pw_dir
            except KeyError:
                home = request.workdir
        env = {"PATH": DEFAULT_PATH, **request.env}
        env.update(HOME=home, USER=account.username, LOGNAME=account.username,
                   UWS_JOB_ID=str(request.job_id))
        return env

    def _start_wrapper(self, request: LaunchRequest, workdir: Path,
                       owner: tuple[int, int] | None) -> None:
        """Start the wrapper in a session of its own. ``setsid -f`` forks and exits at once,
        so the wrapper is reparented to init rather than left as our child."""
        argv = [_which("setsid"), "-f"]
        if owner is not None:
            argv += [_which("setpriv"), f"--reuid={owner[0]}", f"--regid={owner[1]}",
                     "--init-groups", "--"]
        argv += [self.settings.shell, str(workdir / WRAPPER)]
        out = _open_nofollow(workdir / WRAPPER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            if owner is not None:
                os.fchown(out, *owner)
            proc = subprocess.Popen(
                argv, cwd=workdir, env=self._environment(request), stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True,
            )
        finally:
            os.close(out)
        if proc.wait(timeout=PID_TIMEOUT_S) != 0:
            raise BackendError("The job could not be started.",
                               log_message=f"{shlex.join(argv)} exited {proc.returncode}")

    @staticmethod
    def _wait_for_pid(workdir: Path) -> int | None:
        deadline = time.monotonic() + PID_TIMEOUT_S
        while True:
            pid = _read_int(workdir / PID_FILE)
            if pid is not None or time.monotonic() >= deadline:
                return pid
            time.sleep(POLL_INTERVAL_S)

    @staticmethod
    def _wrapper_output(workdir: Path) -> str:
        try:
            return (workdir / WRAPPER_LOG).read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    def _record(self, job_id: int, workdir: Path, pid: int, cpus: int) -> dict[str, Any]:
        """Build the handle and store it, so a retried launch returns it unchanged."""
        ticks = _start_ticks(pid)
        if ticks is not None and _runs_other_program(pid, workdir):
            # Only a job that already ended (its pid since reused) or a forged pid file gets
            # here. Keep the pid, but with ticks that never match, never as ours.
            log.warning("pid %d in %s is not the job's wrapper", pid, workdir)
            ticks = -1
        handle = {
            "id": pid,
            "pgid": pid,
            "start_ticks": ticks,
            "workdir": str(workdir),
            "job_id": job_id,
            "cpus": cpus,
            "hostname": self.settings.hostname,
            # The wrapper writes the pid file as its first act: its mtime is the start.
            "started_at": (workdir / PID_FILE).stat().st_mtime,
        }
        _write_atomic(workdir / LAUNCH_RECORD, json.dumps(handle))
        return handle

    # poll / wait -------------------------------------------------------------------------

    async def poll(self, handle: Mapping[str, Any]) -> JobState:
        return self._state(handle)

    def _state(self, handle: Mapping[str, Any]) -> JobState:
        exit_file = Path(handle["workdir"]) / EXIT_FILE
        code = _read_int(exit_file)
        if code is None:
            if _is_alive(int(handle["id"]), handle.get("start_ticks")):
                return self._job_state(handle, "running")
            # The wrapper writes the exit file just before it exits: read it again, it may
            # have appeared between the first read and the liveness check.
            code = _read_int(exit_file)
        if code is None:
            return self._job_state(handle, "failed", "process ended without an exit status")
        end = exit_file.stat().st_mtime
        if code == 0:
            return self._job_state(handle, "complete", exit_code=0, end=end)
        return self._job_state(handle, "failed", f"exit code {code}", exit_code=code, end=end)

    def _job_state(self, handle: Mapping[str, Any], status: str, detail: str = "", *,
                   exit_code: int | None = None, end: float | None = None) -> JobState:
        elapsed = max(0.0, (end or time.time()) - float(handle["started_at"]))
        return JobState(
            status=status, detail=detail, exit_code=exit_code,
            hostname=handle.get("hostname", self.settings.hostname),
            core_hours=int(handle.get("cpus", 1)) * elapsed / 3600,
        )

    # ``timeout`` is the name the ComputeResource contract gives this parameter.
    async def wait(self, handle: Mapping[str, Any], timeout: float) -> JobState:
        if await _wait_exit(int(handle["id"]), handle.get("start_ticks"), timeout):
            await self._wait_for_exit_file(Path(handle["workdir"]))
        return self._state(handle)

    @staticmethod
    async def _wait_for_exit_file(workdir: Path) -> None:
        # The wrapper writes the file before it exits, so this loop rarely turns at all.
        for _ in range(int(EXIT_FILE_TIMEOUT_S / POLL_INTERVAL_S)):
            if (workdir / EXIT_FILE).exists():
                return
            await asyncio.sleep(POLL_INTERVAL_S)

    # stop --------------------------------------------------------------------------------

    async def stop(self, handle: Mapping[str, Any], grace_seconds: float) -> None:
        pid, pgid = int(handle["id"]), int(handle.get("pgid", handle["id"]))
        ticks = handle.get("start_ticks")
        if _is_reused(pid, ticks):
            return  # our group is gone entirely and the pid names a stranger now
        strays = _descendants(pid) if _is_alive(pid, ticks) else []
        if not _signal_group(pgid, signal.SIGTERM):
            return  # nothing of the job is left
        await _wait_exit(pid, ticks, grace_seconds)
        if not _is_reused(pid, ticks):
            _signal_group(pgid, signal.SIGKILL)
        for stray, stray_ticks in strays:
            if _is_alive(stray, stray_ticks):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stray, signal.SIGKILL)


def _which(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise BackendError("The job could not be started.",
                           log_message=f"{program} not found on PATH")
    return path


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a process group; False when it has no member left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


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
        if not _is_alive(pid, start_ticks):
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
    while _is_alive(pid, start_ticks):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(FALLBACK_POLL_S, remaining))
    return True
