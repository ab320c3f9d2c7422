"""The worker's side of the launcher (``supervisor.py --serve``): one per worker process
and state directory, started at the first launch, asked over its socket for each job.

A job's supervisor used to be a new ``python -I -S`` per job, 25 ms of CPU before the job
could start; forked from the launcher it costs about a millisecond. The launcher is this
process's child and ends with it; the supervisors it forked do not (they are in sessions
of their own), so a worker restart still leaves every job running.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

SUPERVISOR = str(Path(__file__).with_name("supervisor.py"))
# A PATH for jobs: the worker's own environment is not passed on, it may hold credentials.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOG_NAME = "launcher.log"
READY_TIMEOUT_S = 10.0


class LauncherError(RuntimeError):
    """The launcher could not be started or reached, or refused the request."""


class Launcher:
    """The launcher of one state directory, for this process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Named after this process: workers sharing a directory each have their own, so a
        # job is started in the worker's own cgroup (a container that stops takes its jobs).
        self.socket_path = root / f"launcher-{os.getpid()}.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawn_lock = threading.Lock()

    def start(self, job_id: int, timeout: float) -> str:
        """Ask for job ``job_id``'s supervisor (its spec is in ``root/<id>/``). The answer:
        ``started`` once it recorded the start, ``another`` when a supervisor of that job
        already runs, or "" when it ended without a word (its log says why)."""
        try:
            return self._ask(job_id, timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            self._spawn()  # first use, or the launcher is gone (killed, say)
            return self._ask(job_id, timeout)

    def _ask(self, job_id: int, timeout: float) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            directory = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:  # through the directory's descriptor: the path may be long
                conn.connect(f"/proc/self/fd/{directory}/{self.socket_path.name}")
            finally:
                os.close(directory)
            conn.sendall(f"{job_id}\n".encode())
            answer = b""
            try:
                while not answer.endswith(b"\n"):
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    answer += chunk
            except TimeoutError:
                raise LauncherError(f"no answer from the launcher within {timeout:g}s "
                                    f"for job {job_id}") from None
        text = answer.decode(errors="replace").strip()
        if text.startswith("refused:"):
            raise LauncherError(f"the launcher refused job {job_id}: {text[8:].strip()}")
        return text

    def _spawn(self) -> None:
        with self._spawn_lock:
            if self._proc is not None and self._proc.poll() is None:
                if self._listening():
                    return  # another thread started it meanwhile
                self._proc.kill()  # alive but deaf: replace it
                self._proc.wait()
            self._remove_stale_sockets()
            log = os.open(self.root / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                          | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", SUPERVISOR, "--serve", str(self.socket_path)],
                    cwd=self.root, env={"PATH": DEFAULT_PATH}, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=log, start_new_session=True)
            finally:
                os.close(log)
            assert proc.stdout is not None
            with proc.stdout:
                ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
                line = proc.stdout.readline() if ready else b""
            if line != b"ready\n":
                proc.kill()
                proc.wait()
                raise LauncherError(f"the launcher did not start: {log_tail(self.root / LOG_NAME)}")
            self._proc = proc

    def _listening(self, name: str | None = None) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            directory = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                probe.connect(f"/proc/self/fd/{directory}/{name or self.socket_path.name}")
            except OSError:
                return False
            finally:
                os.close(directory)
        return True

    def _remove_stale_sockets(self) -> None:
        """The sockets of launchers whose worker is gone (nobody listens on them)."""
        for path in self.root.glob("launcher-*.sock"):
            if path != self.socket_path and not self._listening(path.name):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def stop(self) -> None:
        """End the launcher (jobs it started go on); for tests and shutdown."""
        with self._spawn_lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(5)
            self._proc = None


_launchers: dict[tuple[int, str], Launcher] = {}
_registry_lock = threading.Lock()


def launcher_for(root: Path) -> Launcher:
    """This process's launcher for ``root`` (a fork of this process gets its own)."""
    key = (os.getpid(), str(root))
    with _registry_lock:
        launcher = _launchers.get(key)
        if launcher is None:
            launcher = _launchers[key] = Launcher(root)
        return launcher


def log_tail(path: Path) -> str:
    """The end of a log of ours (a launcher's, a supervisor's), for an error message."""
    try:
        return path.read_text(errors="replace")[-2000:]
    except FileNotFoundError:
        return ""

