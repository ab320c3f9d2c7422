"""A single-node Slurm cluster on loopback for development and tests (``uws slurm-dev``).

munged, slurmctld, slurmd and slurmrestd (JWT auth, OpenAPI v0.0.38) run from Debian's
packages with everything under one state directory: config, keys, sockets, logs, pid files.
Nothing system-wide is touched besides installing the packages and creating the
``slurmrestd`` system user, so clusters with other state dirs and ports can run side by
side. Daemons are stopped only by the pids in their pid files, and only when
``/proc/PID/exe`` is the expected binary. Must run as root: slurmd starts jobs as users.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controllers.resources.slurm.tokens import mint_jwt

PACKAGES = ["slurmctld", "slurmd", "slurmrestd", "slurm-client", "slurm-wlm-basic-plugins",
            "slurm-wlm-jwt-plugin", "munge"]
MUNGED = "/usr/sbin/munged"
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
SLURMRESTD = "/usr/sbin/slurmrestd"
SLURM_USER = "slurm"
API_VERSION = "v0.0.38"
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmrestd")
ENABLE_HINT = "run `.venv/bin/uws slurm-dev install` (as root) or .ci/run"

# Slurm processes started here (slurmrestd), reaped when stopped so none stays a zombie.
_children: dict[int, subprocess.Popen[bytes]] = {}


class SlurmDevError(RuntimeError):
    pass


@dataclass(frozen=True)
class DevCluster:
    state_dir: Path
    rest_port: int = 6820
    ctld_port: int = 6817
    slurmd_port: int = 6818
    rest_user: str = "slurmrestd"
    cpus: int | None = None  # None: the machine's; more oversubscribes
    mem_per_cpu_mb: int = 512
    min_job_age_s: int = 3600

    @classmethod
    def from_env(cls) -> DevCluster:
        env = os.environ.get
        return cls(
            state_dir=Path(env("UWS_SLURM_DEV_DIR", "/tmp/uws-slurm-dev")),
            rest_port=int(env("UWS_SLURM_DEV_REST_PORT", "6820")),
            ctld_port=int(env("UWS_SLURM_DEV_CTLD_PORT", "6817")),
            slurmd_port=int(env("UWS_SLURM_DEV_SLURMD_PORT", "6818")),
            cpus=int(env("UWS_SLURM_DEV_CPUS", "0")) or None,
        )

    @property
    def conf(self) -> Path:
        return self.state_dir / "etc" / "slurm.conf"

    @property
    def jwt_key(self) -> Path:
        return self.state_dir / "etc" / "jwt_hs256.key"

    def under(self, name: str) -> Path:
        """One of the cluster's directories: ``munge``, ``run``, ``log``."""
        return self.state_dir / name

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def env(self) -> dict[str, str]:
        """The environment for Slurm's client commands against this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def pid_file(self, daemon: str) -> Path:
        if daemon == "munged":
            return self.under("munge") / "munged.pid"
        return self.under('run') / f"{daemon}.pid"


_BINARIES = {"munged": MUNGED, "slurmctld": SLURMCTLD, "slurmd": SLURMD,
             "slurmrestd": SLURMRESTD}


# --- packages and users -------------------------------------------------------------


def installed() -> bool:
    binaries = [MUNGED, SLURMCTLD, SLURMD, SLURMRESTD, "/usr/bin/scontrol"]
    return (all(os.access(b, os.X_OK) for b in binaries)
            and bool(glob.glob("/usr/lib/*/slurm-wlm/auth_jwt.so")))


def install(log: Callable[[str], None] = print) -> None:
    """apt-get install the packages (no recommends); on failure update the lists once and
    try again."""
    if installed():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    log("installing " + " ".join(PACKAGES))
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        log("apt-get install failed; running apt-get update and retrying")
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SlurmDevError(f"apt-get install failed:\n{done.stdout[-1500:]}{done.stderr}")


def _ensure_users(cluster: DevCluster) -> None:
    for name in (SLURM_USER, "munge"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise SlurmDevError(f"user {name} is missing (it comes with the packages)") from None
    try:
        pwd.getpwnam(cluster.rest_user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                        cluster.rest_user], check=True)


# --- config -------------------------------------------------------------------------


def _mkdir(path: Path, mode: int, owner: str | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner:
        shutil.chown(path, owner, owner)


def _key(path: Path, size: int, owner: str, mode: int) -> None:
    if not path.exists() or path.stat().st_size == 0:
        path.write_bytes(os.urandom(size))
    shutil.chown(path, owner, owner)
    os.chmod(path, mode)


def _node_hardware(cpus: int | None) -> tuple[str, str]:
    """slurmd's own description of this node (``CPUs=… RealMemory=…``), and an extra
    config line when more CPUs are advertised than exist."""
    first = subprocess.run([SLURMD, "-C"], capture_output=True, text=True,
                           check=True).stdout.splitlines()[0]
    hardware = first.split(" ", 1)[1]  # drop "NodeName=<host>"
    real = int(re.search(r"\bCPUs=(\d+)", hardware).group(1))  # type: ignore[union-attr]
    if cpus is None or cpus == real:
        return hardware, ""
    memory = re.search(r"RealMemory=(\d+)", hardware).group(1)  # type: ignore[union-attr]
    return f"CPUs={cpus} RealMemory={memory}", "SlurmdParameters=config_overrides"


def write_config(cluster: DevCluster) -> None:
    s = cluster.state_dir
    _mkdir(s, 0o755)
    for sub in ("etc", "run", "spool"):
        _mkdir(s / sub, 0o755)
    (s / ".uws-slurm-dev").touch()
    _mkdir(cluster.under("log"), 0o755, SLURM_USER)
    _mkdir(s / "ctld", 0o700, SLURM_USER)
    _mkdir(cluster.under("munge"), 0o755, "munge")  # o+x: clients reach the socket through it
    _key(cluster.under("munge") / "munge.key", 1024, "munge", 0o400)
    _key(cluster.jwt_key, 32, SLURM_USER, 0o600)  # read by slurmctld; root mints tokens

    node = socket.gethostname().split(".")[0]
    hardware, extra = _node_hardware(cluster.cpus)
    lines = [
        "# Written by uws slurm-dev: a single-node cluster on loopback",
        "ClusterName=uwsdev",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={cluster.ctld_port}",
        f"SlurmdPort={cluster.slurmd_port}",
        f"SlurmUser={SLURM_USER}",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={cluster.under('munge') / 'munge.socket'}",
        "CredType=cred/munge",
        "AuthAltTypes=auth/jwt",
        f"AuthAltParameters=jwt_key={cluster.jwt_key}",
        f"StateSaveLocation={s / 'ctld'}",
        f"SlurmdSpoolDir={s / 'spool'}",
        f"SlurmctldPidFile={cluster.pid_file('slurmctld')}",
        f"SlurmdPidFile={cluster.pid_file('slurmd')}",
        f"SlurmctldLogFile={cluster.under('log') / 'slurmctld.log'}",
        f"SlurmdLogFile={cluster.under('log') / 'slurmd.log'}",
        "MailProg=/bin/true",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        # Without a default, each job would get the whole node's memory: one job at a time.
        f"DefMemPerCPU={cluster.mem_per_cpu_mb}",
        # Start batch jobs at once instead of batching submissions for ~3 s.
        "SchedulerParameters=batch_sched_delay=0",
        "ReturnToService=2",
        f"MinJobAge={cluster.min_job_age_s}",
        extra,
        f"NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    text = "\n".join(line for line in lines if line) + "\n"
    if not cluster.conf.exists() or cluster.conf.read_text() != text:
        tmp = cluster.conf.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, cluster.conf)


# --- processes ----------------------------------------------------------------------


def _running(pid: int) -> bool:
    """Exists and is not a zombie (an orphan may wait a while for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def daemon_pid(cluster: DevCluster, daemon: str) -> int | None:
    """The pid in the daemon's pid file, if that process runs the daemon's binary."""
    try:
        pid = int(cluster.pid_file(daemon).read_text().strip() or "0")
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        exe = os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return None
    # Debian's slurmctld/slurmd are alternatives symlinks: compare resolved paths.
    if exe != os.path.realpath(_BINARIES[daemon]) or not _running(pid):
        return None
    return pid


def status(cluster: DevCluster) -> dict[str, int | None]:
    return {d: daemon_pid(cluster, d) for d in DAEMONS}


def _wait(what: str, check: Callable[[], bool], timeout: float, cluster: DevCluster) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SlurmDevError(f"timed out after {timeout:g}s waiting for {what} "
                                f"(logs: {cluster.under('log')})")
        time.sleep(0.1)


def _quiet(cmd: list[str], cluster: DevCluster) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=10)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def token(cluster: DevCluster, user: str, lifespan_s: int = 3600) -> str:
    """A JWT for ``user``, signed with the cluster's key (what ``scontrol token`` makes)."""
    return mint_jwt(cluster.jwt_key.read_bytes(), user, lifespan_s)


def rest_ping_ok(cluster: DevCluster) -> bool:
    req = urllib.request.Request(
        f"{cluster.rest_url}/slurm/{API_VERSION}/ping",
        headers={"X-SLURM-USER-NAME": "root", "X-SLURM-USER-TOKEN": token(cluster, "root", 60)})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            body = json.load(resp)
    except (OSError, ValueError):
        return False
    return any(p.get("ping") == "UP" for p in body.get("pings") or [])


def _node_ready(cluster: DevCluster, since: float) -> bool:
    """The node is usable and its slurmd registered after ``since`` (a restarted slurmctld
    recovers an old ``idle`` before the new slurmd has registered)."""
    node = socket.gethostname().split(".")[0]
    out = _quiet(["scontrol", "-o", "show", "node", node], cluster).stdout
    state = re.search(r"\bState=(\S+)", out)
    started = re.search(r"\bSlurmdStartTime=(\S+)", out)
    if not state or not started or started.group(1) in ("None", "Unknown"):
        return False
    base = state.group(1).split("+")[0]
    if base not in ("IDLE", "MIXED", "ALLOCATED") or "NOT_RESPONDING" in state.group(1):
        return False
    return dt.datetime.fromisoformat(started.group(1)).timestamp() >= int(since)


def start_daemon(cluster: DevCluster, daemon: str) -> None:
    if daemon_pid(cluster, daemon) is not None:
        return
    if daemon == "munged":
        sock = cluster.under("munge") / "munge.socket"
        subprocess.run(["runuser", "-u", "munge", "--", MUNGED, f"--socket={sock}",
                        f"--key-file={cluster.under('munge') / 'munge.key'}",
                        f"--pid-file={cluster.pid_file('munged')}",
                        f"--log-file={cluster.under('munge') / 'munged.log'}",
                        f"--seed-file={cluster.under('munge') / 'munged.seed'}"], check=True)
        _wait("munged", lambda: _quiet(["munge", "-S", str(sock), "-n"], cluster).returncode
              == 0, 10, cluster)
    elif daemon == "slurmctld":
        _need_port(cluster.ctld_port)
        subprocess.run([SLURMCTLD, "-f", str(cluster.conf)], env=cluster.env(), check=True)
        _wait("slurmctld", lambda: _quiet(["scontrol", "ping"], cluster).returncode == 0, 30,
              cluster)
    elif daemon == "slurmd":
        _need_port(cluster.slurmd_port)
        since = time.time()
        node = socket.gethostname().split(".")[0]
        subprocess.run([SLURMD, "-f", str(cluster.conf), "-N", node], env=cluster.env(),
                       check=True)
        _wait("slurmd", lambda: _node_ready(cluster, since), 30, cluster)
    elif daemon == "slurmrestd":
        _start_rest(cluster)
    else:
        raise ValueError(daemon)


def _need_port(port: int) -> None:
    if not _port_free(port):
        raise SlurmDevError(f"port {port} on 127.0.0.1 is taken")


def _start_rest(cluster: DevCluster) -> None:
    _need_port(cluster.rest_port)
    log = (cluster.under("log") / "slurmrestd.log").open("ab")
    # slurmrestd refuses to run as root or SlurmUser: started as root, it drops to -u/-g
    # itself (so the pid is its own). SLURM_JWT=daemon: it passes the callers' tokens on.
    proc = subprocess.Popen(
        [SLURMRESTD, "-f", str(cluster.conf), "-u", cluster.rest_user, "-g", cluster.rest_user,
         "-a", "rest_auth/jwt", "-s", f"openapi/{API_VERSION}",
         f"127.0.0.1:{cluster.rest_port}"],
        env={**cluster.env(), "SLURM_JWT": "daemon"}, stdin=subprocess.DEVNULL,
        stdout=log, stderr=log, start_new_session=True)
    log.close()
    _children[proc.pid] = proc
    cluster.pid_file("slurmrestd").write_text(f"{proc.pid}\n")

    def up() -> bool:
        if proc.poll() is not None:
            raise SlurmDevError(f"slurmrestd exited with {proc.returncode}; see "
                                f"{cluster.under('log') / 'slurmrestd.log'}")
        return rest_ping_ok(cluster)

    _wait("slurmrestd ping", up, 30, cluster)


def stop_daemon(cluster: DevCluster, daemon: str, timeout: float = 5.0) -> None:
    pid = daemon_pid(cluster, daemon)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if _running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap(pid, block=True)
    with contextlib.suppress(FileNotFoundError):
        cluster.pid_file(daemon).unlink()


def _reap(pid: int, block: bool = False) -> None:
    proc = _children.get(pid)
    if proc is None:
        return
    if block:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    if proc.poll() is not None:
        _children.pop(pid, None)


def start(cluster: DevCluster, *, install_missing: bool = True) -> dict[str, str]:
    """Start whatever is not running; return how to reach the cluster."""
    if os.geteuid() != 0:
        raise SlurmDevError("must run as root (slurmd starts jobs as other users)")
    if not installed():
        if not install_missing:
            raise SlurmDevError(f"Slurm is not installed: {ENABLE_HINT}")
        install()
    _ensure_users(cluster)
    if not any(status(cluster).values()) or not cluster.conf.exists():
        write_config(cluster)  # never rewritten under running daemons
    for daemon in DAEMONS:
        start_daemon(cluster, daemon)
    return {"SLURM_REST_URL": cluster.rest_url, "SLURM_REST_API": f"/slurm/{API_VERSION}",
            "SLURM_CONF": str(cluster.conf), "SLURM_JWT_KEY": str(cluster.jwt_key)}


def stop(cluster: DevCluster) -> None:
    """Cancel the cluster's jobs (so no job outlives slurmd), then stop the daemons."""
    if daemon_pid(cluster, "slurmctld") is not None:
        ids = _quiet(["squeue", "-h", "-o", "%i"], cluster).stdout.split()
        if ids:
            _quiet(["scancel", *ids], cluster)
            busy = ["squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i"]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _quiet(busy, cluster).stdout.strip():
                time.sleep(0.2)
    for daemon in reversed(DAEMONS):
        stop_daemon(cluster, daemon)


def cluster_for(url: str, jwt_key_file: str | None) -> DevCluster:
    """The dev cluster a SlurmResource's settings point at: its REST port from ``url`` and
    its state dir from ``jwt_key_file`` (``<state>/etc/jwt_hs256.key``) when that is one."""
    base = DevCluster.from_env()
    port = re.search(r":(\d+)/*$", url)
    state = base.state_dir
    if jwt_key_file and Path(jwt_key_file).parent.name == "etc":
        state = Path(jwt_key_file).parent.parent
    return DevCluster(state_dir=state, rest_port=int(port.group(1)) if port else base.rest_port,
                      ctld_port=base.ctld_port, slurmd_port=base.slurmd_port, cpus=base.cpus)


def main(argv: list[str]) -> int:
    """``uws slurm-dev start|stop|status|token USER|install``."""
    cluster = DevCluster.from_env()
    command = argv[0] if argv else "status"
    if command == "install":
        install()
        print("Slurm packages installed" if installed() else "Slurm packages missing")
        return 0 if installed() else 1
    if command == "start":
        for key, value in start(cluster).items():
            print(f"{key}={value}")
        return 0
    if command == "stop":
        stop(cluster)
        return 0
    if command == "status":
        states = status(cluster)
        for daemon, pid in states.items():
            print(f"{daemon}: " + (f"running (pid {pid})" if pid else "stopped"))
        return 0 if all(states.values()) else 1
    if command == "token" and len(argv) >= 2:
        print(token(cluster, argv[1], int(argv[2]) if len(argv) > 2 else 3600))
        return 0
    raise SystemExit("usage: uws slurm-dev start|stop|status|token USER [SECONDS]|install")
