"""The supervisor of one local job, and the launcher that forks one per job.

The launcher runs as the service (root in multi-user mode), started by a worker with
``python -I -S supervisor.py --serve SOCKET``: standard library only, so it imports nothing
a user could shadow. For each job the worker names on that socket (``0600``, in the
service's 0700 state directory, and only the service's own uid is answered) it forks a
supervisor, so a job costs a fork rather than a new interpreter (about 25 ms of CPU, the
largest share of a start when many start at once). It ends when its worker does, or when
its socket is removed; the supervisors it forked go on without it.

Everything the worker later believes about the job comes from here, written into
``STATE_DIR`` (the service's, mode 0700), never from the job's own directory:

``spec.json``     what to run, written by the worker before it starts us
``started.json``  our pid and start ticks, the job's pid, the start time (server clock)
``ended.json``    the job's exit code from ``waitpid`` and the end time (server clock)

Steps: in a session of our own, hold ``supervisor.lock`` for our whole life (the worker's
proof that we live), become a child subreaper (whatever the job leaves
behind is reparented to us, so nothing escapes a stop), enter a network namespace of our
own when asked (only its loopback, brought up: the job cannot reach a port of the host),
then fork the job: a new session, the account's own groups, uid and gid, its workdir, and
``exec`` of its script; once ``started.json`` is written, tell the worker. ``SIGTERM`` to
us stops the job: TERM to every descendant, KILL after the grace period. When the job's
main process ends, what it left is stopped too.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import stat
import struct
import sys
import time
import traceback

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000
PR_SET_CHILD_SUBREAPER = 36
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
# After the job's main process ended, what it left behind gets this long after a TERM.
LEFTOVER_GRACE_S = 2.0
# Once KILLing, the whole tree is swept this often until nothing of it is left.
KILL_SWEEP_INTERVAL_S = 0.05
EXIT_ANOTHER_SUPERVISOR = 75
# The launcher looks this often whether its worker and its socket are still there.
LAUNCHER_CHECK_S = 2.0
# How long the launcher gives a worker to send its request once connected.
REQUEST_TIMEOUT_S = 2.0
# What a supervisor answers the worker that asked for it.
STARTED, ANOTHER = b"started\n", b"another\n"


def write_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _oom_score_adj(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass  # not root (personal mode): the kernel's defaults stand


def signal_all(sig: int) -> None:
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def isolate(libc: ctypes.CDLL, hidden: list[str]) -> None:
    """Network and mount namespaces of our own. The network one holds only its loopback,
    up (Jupyter's kernels talk to their server over it), so no port of the host is
    reachable. A network namespace does not cover Unix sockets in the file system: the
    directories of the control plane's (PostgreSQL's, say) are covered by an empty,
    read-only tmpfs in our mount namespace, which first stops sharing mounts with the host
    so nothing we mount is seen outside."""
    _check(libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare(CLONE_NEWNET | CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    for path in dict.fromkeys(os.path.realpath(p) for p in hidden):
        if os.path.isdir(path):
            flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
            _check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", flags, b"size=4k,mode=0555"),
                   f"mount tmpfs on {path}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def run_job(spec: dict, report: int) -> None:
    """In the forked child: become the job. Never returns."""
    try:
        os.setsid()
        _oom_score_adj(0)
        if spec["switch_user"]:
            os.initgroups(spec["username"], spec["gid"])  # that account's groups only
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
            if os.getuid() != spec["uid"] or os.geteuid() != spec["uid"]:
                raise PermissionError("could not switch to the job's account")
        os.umask(0o077)
        workdir = spec["workdir"]
        # As the account itself: a link it planted here can only lead where it may write.
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        os.chdir(workdir)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd = os.open("job.sh", flags, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(spec["script"])
        log = os.open("job.log", flags, 0o600)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM,
                    signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        shell = spec["shell"]
        os.execve(shell, [shell, "job.sh"], spec["env"])
    except BaseException as exc:  # reported to the supervisor, then exit
        try:
            os.write(report, f"{type(exc).__name__}: {exc}".encode()[:2000])
        finally:
            os._exit(127)


def supervise(state_dir: str, worker: socket.socket) -> int:
    """Run the job of ``state_dir`` to its end; ``worker`` hears when it has started."""
    with open(os.path.join(state_dir, "spec.json")) as f:
        spec = json.load(f)
    lock = os.open(os.path.join(state_dir, "supervisor.lock"),
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        answer(worker, ANOTHER)
        return EXIT_ANOTHER_SUPERVISOR
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # The OOM killer takes a job's process, never the supervisor holding its tree together.
    _oom_score_adj(-1000)
    ended_path = os.path.join(state_dir, "ended.json")
    if spec["isolate_network"]:
        try:
            isolate(libc, spec.get("hidden_paths", []))
        except OSError as exc:
            write_atomic(os.path.join(state_dir, "started.json"), _started(0, time.time()))
            write_atomic(ended_path, {"code": 127, "ended_at": time.time(),
                                      "detail": f"no network namespace: {exc}"})
            answer(worker, STARTED)
            return 1
    stopping = {"requested": False}
    grace = float(spec.get("stop_grace_seconds", 10.0))

    def on_term(signum: int, frame: object) -> None:
        if not stopping["requested"]:
            stopping["requested"] = True
            signal_all(signal.SIGTERM)
            signal.setitimer(signal.ITIMER_REAL, max(grace, 0.1))

    def on_alarm(signum: int, frame: object) -> None:
        # One sweep is not enough: a process may fork between our reading /proc and its
        # KILL, and that child would go on (and keep us waiting) unseen. Sweep again
        # until none is left; the waitpid loop below ends, and disarms this, once none is.
        signal_all(signal.SIGKILL)
        signal.setitimer(signal.ITIMER_REAL, KILL_SWEEP_INTERVAL_S)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, on_alarm)
    report_r, report_w = os.pipe()  # both close on exec (PEP 446)
    job = os.fork()
    if job == 0:
        os.close(report_r)
        run_job(spec, report_w)
    os.close(report_w)
    write_atomic(os.path.join(state_dir, "started.json"), _started(job, time.time()))
    answer(worker, STARTED)
    failure = b""
    while chunk := os.read(report_r, 2000):  # empty once the job's exec closed it
        failure += chunk
    os.close(report_r)
    code, ended_at = None, None
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == job:
            exit_code = os.waitstatus_to_exitcode(status)
            code = exit_code if exit_code >= 0 else 128 - exit_code
            ended_at = time.time()
            if not stopping["requested"]:  # the job is over: so is what it left running
                stopping["requested"] = True
                signal_all(signal.SIGTERM)
                signal.setitimer(signal.ITIMER_REAL, LEFTOVER_GRACE_S)
    signal.setitimer(signal.ITIMER_REAL, 0)
    detail = f"could not start the job: {failure.decode(errors='replace')}" if failure else ""
    write_atomic(ended_path, {"code": 127 if code is None else code,
                              "ended_at": ended_at or time.time(), "detail": detail})
    return 0


def _started(job: int, started_at: float) -> dict:
    me = os.getpid()
    return {"supervisor_pid": me, "supervisor_ticks": start_ticks(me), "job_pid": job,
            "job_ticks": start_ticks(job) if job else None, "started_at": started_at}


def check_network_namespace() -> int:
    """``--check``: exit 0 when this process may create the namespaces jobs run in."""
    if os.fork() == 0:
        try:
            isolate(ctypes.CDLL(None, use_errno=True), [])
        except OSError as exc:
            print(exc, file=sys.stderr)
            os._exit(1)
        os._exit(0)
    _, status = os.wait()
    return os.waitstatus_to_exitcode(status)


def answer(worker: socket.socket, what: bytes) -> None:
    """Tell the worker that asked for this job; it may have given up waiting."""
    try:
        worker.sendall(what)
    except OSError:
        pass
    worker.close()


# --- the launcher -----------------------------------------------------------------------

def serve(socket_path: str) -> int:
    """``--serve SOCKET``: fork a supervisor for each job a worker names on ``SOCKET``.
    Says ``ready`` on stdout once it listens; ends with its parent (the worker)."""
    parent = os.getppid()
    root, name = os.path.split(socket_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # a launcher of a worker that is gone (we hold its name)
    # Bound through the directory's descriptor: a socket's path may be 107 bytes at most.
    directory = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        server.bind(f"/proc/self/fd/{directory}/{name}")
    finally:
        os.umask(old_umask)
        os.close(directory)
    server.listen(128)
    ours = os.stat(socket_path)
    # Supervisors are reaped by the kernel: a launcher never waits for one.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is its worker's business
    os.write(1, b"ready\n")
    os.dup2(2, 1)
    server.settimeout(LAUNCHER_CHECK_S)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent or not _same_file(socket_path, ours):
                break
            continue
        with conn:
            try:
                launch_for(conn, server, root)
            except Exception:  # one bad request never ends the launcher
                traceback.print_exc()
    server.close()
    if _same_file(socket_path, ours):
        os.unlink(socket_path)
    return 0


def _same_file(path: str, ours: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)


def launch_for(conn: socket.socket, server: socket.socket, root: str) -> None:
    """One request: a job id, whose state directory (under ``root``) holds its spec."""
    conn.settimeout(REQUEST_TIMEOUT_S)
    # The request is read before anything is answered: a refusal sent first would break
    # the pipe the asker is still writing to, and it would never read why.
    request = b""
    try:
        while not request.endswith(b"\n") and len(request) < 64:
            chunk = conn.recv(64)
            if not chunk:
                break
            request += chunk
    except OSError:
        return
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    struct.calcsize("3i")))
    if uid != os.geteuid():  # the directory already keeps others out; this says so twice
        refuse(conn, "not the service's account")
        return
    job = request.decode("ascii", "replace").strip()
    state_dir = os.path.join(root, job)
    try:
        info = os.lstat(state_dir) if job.isdigit() else None
    except OSError:
        info = None
    if info is None or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        refuse(conn, "no such job")
        return
    if os.path.lexists(os.path.join(state_dir, "started.json")):
        refuse(conn, "that job was started already")  # a job runs once, never again
        return
    try:
        child = os.fork()
    except OSError as exc:  # out of processes, say: this job's launch is retried
        refuse(conn, f"cannot fork ({exc.strerror})")
        return
    if child == 0:
        code = 1
        try:
            server.close()
            become_supervisor(state_dir)
            code = supervise(state_dir, conn)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)


def refuse(conn: socket.socket, why: str) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(f"refused: {why}\n".encode())


def become_supervisor(state_dir: str) -> None:
    """In the launcher's child: a session of its own, its log, default signals."""
    os.setsid()
    for sig in (signal.SIGCHLD, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.chdir(state_dir)
    log = os.open("supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                  | os.O_CLOEXEC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(check_network_namespace())
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2]))
    sys.exit("usage: supervisor.py --serve SOCKET | --check")
