"""What the benchmarks share: how one runs, the stack it measures, its set-up calls and
the figures it reports.

Every bench imports this module before any other of ``bench``:

    try:  # `python bench/x.py`: bench/, not the repository, is on sys.path; harness adds it
        import harness
    except ModuleNotFoundError:  # `python -m bench.x`
        from bench import harness

The processes are started by the project's one launcher, ``app.stack``: ``start_stack``
is a ``UwsStack`` (Temporal dev server, ``uws worker``, the API) on a fresh database of
the machine's PostgreSQL, else of the embedded one (``app.dev_database``).

Figures: when ``UWS_BENCH_JSON`` names a file, each figure a script prints is also
appended there as one JSON line ``{"bench", "metric", "value", "unit"}`` (``emit``);
``bench/run_all.py`` collects them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from app.dev_database import embedded_database_url
from app.stack import HOST, UWS, UwsStack, free_port, port_open

if TYPE_CHECKING:  # imported where used: the Slurm and local resource code is heavy
    from app.slurm_dev import DevCluster

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python bench/x.py`: the `bench` package is here
    sys.path.insert(0, str(REPO))

ENV = "UWS_BENCH_JSON"
LOCAL_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SERVE_API = [sys.executable, "-m", "bench.serve_api"]  # the app plus /bench/constant/
CONSTANT_ENV = "UWS_BENCH_CONSTANT_FILE"  # what bench.serve_api's constant route returns
JOB_TYPE = "local_test_job"
LOCAL_TEST_JOB_SECONDS = 1.0  # its default in local_test_config; every bench request sets it
SLURM_CONFIG = REPO / "tests" / "data" / "slurm-config.toml"


# --- figures --------------------------------------------------------------------------

def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p50 of 40 values is the 20th smallest), one definition for
    every figure the benchmarks print."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def emit(bench: str, metric: str, value: float, unit: str) -> None:
    """Append one figure; nothing when ``UWS_BENCH_JSON`` is unset or the value is not a
    finite number (a phase that did not run)."""
    path = os.environ.get(ENV)
    if not path or not isinstance(value, int | float) or not math.isfinite(value):
        return
    line = json.dumps({"bench": bench, "metric": metric, "value": value, "unit": unit})
    with open(path, "a", encoding="utf-8") as out:
        out.write(line + "\n")


# --- running a bench ------------------------------------------------------------------

def print_machine() -> None:
    """CPUs and load: the machine is shared, so every figure is read against them."""
    load1, load5, load15 = os.getloadavg()
    print(f"cpus: {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}); "
          f"load average at start: {load1:.2f} {load5:.2f} {load15:.2f}", flush=True)


def _raise_on_sigterm() -> None:
    def handler(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_with_cleanup(run: Callable[[argparse.Namespace, Path, contextlib.ExitStack], int],
                     args: argparse.Namespace) -> int:
    """``run(args, tmp, stack)`` in a temporary directory with ``tmp / "logs"`` made (where
    ``start_stack`` puts its logs); the last lines of every log there are printed when
    it raises, and whatever it registered on ``stack`` is stopped on every exit (SIGTERM
    and Ctrl-C included)."""
    _raise_on_sigterm()
    try:
        with tempfile.TemporaryDirectory(prefix="uws-bench-") as tmp, \
                contextlib.ExitStack() as stack:
            logs = Path(tmp) / "logs"
            logs.mkdir()
            try:
                return run(args, Path(tmp), stack)
            except Exception:
                print_log_tails(logs)
                raise
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130


def run_bench(run: Callable[[argparse.Namespace, Path, contextlib.ExitStack], int],
              parse_args: Callable[[], argparse.Namespace], *, slurm: bool = False) -> int:
    """A bench's ``main``: exit status 2 (why on stderr) when ``slurm`` and this is not
    root with Slurm installed; else its arguments, the machine, then
    ``run_with_cleanup(run, args)``."""
    if slurm:
        from app import slurm_dev

        if os.geteuid() != 0 or not slurm_dev.installed():
            print(f"needs root and Slurm ({slurm_dev.ENABLE_HINT})", file=sys.stderr)
            return 2
    args = parse_args()
    print_machine()
    return run_with_cleanup(run, args)


def checked_args(parser: argparse.ArgumentParser, *, at_least_one: tuple[str, ...] = (),
                 positive: tuple[str, ...] = ()) -> argparse.Namespace:
    """``parser``'s arguments, refused (``parser.error``: "--a and --b must be at least 1
    and --c positive") unless the options in ``at_least_one`` are at least 1 and those in
    ``positive`` above 0."""
    args = parser.parse_args()

    def value(option: str) -> float:
        return getattr(args, option.lstrip("-").replace("-", "_"))

    if any(value(o) < 1 for o in at_least_one) or any(value(o) <= 0 for o in positive):
        rules = [f"{' and '.join(at_least_one)} must be at least 1"] if at_least_one else []
        if positive:
            rules.append(f"{' and '.join(positive)} {'' if rules else 'must be '}positive")
        parser.error(" and ".join(rules))
    return args


def print_log_tails(logs: Path, lines: int = 15) -> None:
    """The last ``lines`` of every ``*.log`` under ``logs``, on stderr."""
    for log in sorted(logs.rglob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            print(f"--- last lines of {log.relative_to(logs)}", *tail, sep="\n",
                  file=sys.stderr)


# --- the database ---------------------------------------------------------------------

async def _admin_sql(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(LOCAL_PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def database(tmp: Path) -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL (dropped afterwards), else embedded."""
    if not port_open(5432):
        yield embedded_database_url(tmp / "embedded", database="uws_bench")
        return
    name = f"uws_bench_{secrets.token_hex(6)}"
    asyncio.run(_admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@{HOST}:5432/{name}"
    finally:
        asyncio.run(_admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def prepare_database(url: str, log: Path) -> str:
    """Migrate, then create an api client; its key. ``uws create-client-token`` does both,
    in a process of its own (Piccolo keeps the first database a process migrated); its
    progress goes to ``log``."""
    name = f"bench-portal-{secrets.token_hex(4)}"
    with log.open("a") as out:
        done = subprocess.run([*UWS, "create-client-token", name], cwd=REPO, text=True,
                              env={**os.environ, "UWS_DATABASE_URL": url},
                              stdout=subprocess.PIPE, stderr=out)
    if done.returncode != 0:
        raise RuntimeError(f"migrating {url} failed:\n{log.read_text()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


# --- configs and the Slurm dev cluster ------------------------------------------------

def write_toml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(config))
    return path


def local_test_config(path: Path) -> Path:
    """The repository's config with a short default duration for ``local_test_job``."""
    config = tomllib.loads((REPO / "config.toml").read_text())
    details = config["available_job_types"][JOB_TYPE]["environment_details"]
    details.setdefault("local_resource", {})["duration_seconds"] = LOCAL_TEST_JOB_SECONDS
    return write_toml(path, config)


def slurm_cluster(stack: contextlib.ExitStack) -> DevCluster:
    """A single-node Slurm cluster (``app/slurm_dev.py``) on free ports, its state in a
    directory of its own its daemons' accounts can read; stopped and removed with
    ``stack``."""
    from app import slurm_dev

    state = Path(tempfile.mkdtemp(prefix="uws-bench-slurm-"))
    state.chmod(0o755)
    stack.callback(shutil.rmtree, state, True)
    cluster = slurm_dev.DevCluster(state_dir=state / "slurm", rest_port=free_port(),
                                   ctld_port=free_port(), slurmd_port=free_port(), cpus=4)
    stack.callback(slurm_dev.stop, cluster)
    slurm_dev.start(cluster, install_missing=False)
    return cluster


def slurm_config(cluster: DevCluster) -> dict[str, Any]:
    """``tests/data/slurm-config.toml``, parsed, its resource pointed at ``cluster``."""
    config = tomllib.loads(SLURM_CONFIG.read_text())
    resource = config["available_resources"]["slurm_resource"]["connection_details"]
    resource.update(url=cluster.rest_url, jwt_key_file=str(cluster.jwt_key))
    return config


# --- the stack ------------------------------------------------------------------------

def traversable_data_dir(stack: contextlib.ExitStack) -> Path:
    """A data dir the jobs' accounts can pass through (multi-user, as root, each job runs
    as its owner's OS account, and the bench's temporary directory is 0700): the search
    bit only, never the read bit, and apart from the bench's database and logs. The
    server's own state below keeps its own modes. Removed when ``stack`` closes (after
    callbacks registered later, such as ``kill_leftover_jobs``)."""
    data_dir = Path(tempfile.mkdtemp(prefix="uws-bench-data-"))
    data_dir.chmod(0o711)
    stack.callback(shutil.rmtree, data_dir, True)
    return data_dir


def read_record(path: Path) -> dict[str, Any] | None:
    """One of the local resource's records of a job (``started.json``, ``ended.json``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def kill_leftover_jobs(data_dir: Path) -> None:
    """TERM the supervisor of every job under our data dir that has not ended (they are
    detached, so stopping the worker leaves them alive); each stops its job's whole tree."""
    from controllers.resources.local.procfs import is_alive
    from controllers.resources.local.resource import ENDED, STARTED

    for path in data_dir.glob(f"local-jobs/*/{STARTED}"):
        if (path.parent / ENDED).exists():
            continue
        record = read_record(path)
        if record is None:
            continue
        with contextlib.suppress(ValueError, TypeError, OSError):
            pid, ticks = int(record["supervisor_pid"]), record.get("supervisor_ticks")
            # Only our supervisor: the pid may have been reused since.
            if is_alive(pid, ticks):
                os.kill(pid, signal.SIGTERM)


def _account_exists(name: str) -> bool:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name) is not None
    return False


def remove_accounts(names: list[str]) -> None:
    """``userdel`` the OS accounts the bench's users got (only ones that did not exist
    before them: ``BenchStack.new_user`` lists them)."""
    for name in names:
        if not _account_exists(name):
            continue  # never created (single-user, or not root)
        done = subprocess.run(["userdel", "--remove", name], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"userdel {name} failed: {done.stderr.strip()}", file=sys.stderr)


@dataclass
class User:
    name: str
    token: str
    workspaces: list[int] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"UWS-Authorization": f"Token {self.token}"}


@dataclass
class BenchStack:
    """A bench's processes (``uws``: Temporal unless shared, one worker, one API), where
    their logs are, and its users."""

    uws: UwsStack
    logs: Path
    database_url: str
    client_key: str  # an api client's: POST /tokens/ takes it
    constant_file: Path  # what GET /bench/constant/ returns, read when the API starts
    accounts: list[str]  # OS accounts made for our users, removed after the stack stopped
    users: list[User] = field(default_factory=list)
    _api_env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self._api_env = dict(self.uws.apis[0].env)

    @property
    def api_port(self) -> int:
        return self.uws.api_ports[0]

    @property
    def api_url(self) -> str:
        return self.uws.api_url()

    @property
    def data_dir(self) -> Path:
        return self.uws.data_dir

    def pids(self) -> dict[str, int]:
        """The processes a bench samples the CPU time of (not their children)."""
        assert self.uws.temporal is not None, "Temporal is another stack's"
        return {"worker": self.uws.workers[0].pid, "temporal": self.uws.temporal.pid,
                "api": self.uws.apis[0].pid}

    def restart_api(self, extra_env: dict[str, str]) -> None:
        """The API again, with ``extra_env`` over the stack's environment."""
        api = self.uws.apis[0]
        api.stop(timeout=15)
        api.env = {**self._api_env, **extra_env}
        self.uws.start_api()

    def new_user(self, workspaces: int = 0) -> User:
        """A user (``POST /tokens/``, which makes the OS account their jobs run as when the
        config says so) with ``workspaces`` workspaces."""
        name = f"uwsbench{secrets.token_hex(4)}"
        if not _account_exists(name):
            self.accounts.append(name)  # before the call: it may leave the account half made
        user = User(name, user_token(self.api_port, self.client_key, name))
        user.workspaces = [create_workspace(self.api_port, user.auth) for _ in range(workspaces)]
        return user


def start_stack(stack: contextlib.ExitStack, tmp: Path, *, config: Path | None = None,
                env: dict[str, str] | None = None, serve_api: bool = True,
                beside: BenchStack | None = None, logs: Path | None = None, users: int = 0,
                workspaces_per_user: int = 0) -> BenchStack:
    """A bench's stack, stopped (and its jobs, accounts, data and database removed) when
    ``stack`` closes: a fresh database, migrated, with an api client (``beside``'s
    database and Temporal dev server when given), a data dir of its own, and
    ``app.stack.UwsStack``'s processes with ``env`` (default: ours), ``config`` as
    ``UWS_CONFIG`` and a task queue of their own. The API is ``bench.serve_api`` (the app
    plus ``GET /bench/constant/``, ``"{}"`` until the bench writes ``constant_file``), or
    ``uws api`` when not ``serve_api``. Logs go to ``logs`` (default ``tmp / "logs"``).
    Then ``users`` users with ``workspaces_per_user`` workspaces each."""
    logs = logs or tmp / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if beside is None:
        url = stack.enter_context(database(tmp))
        client_key, temporal = prepare_database(url, logs / "migrate.log"), None
    else:
        url, client_key = beside.database_url, beside.client_key
        temporal = beside.uws.temporal_address
    data_dir = traversable_data_dir(stack)
    accounts: list[str] = []
    stack.callback(remove_accounts, accounts)  # after the processes stopped
    stack.callback(kill_leftover_jobs, data_dir)  # after the worker stopped
    constant = tmp / "constant.json"
    if not constant.exists():
        constant.write_text("{}")  # bench.serve_api refuses to start without it
    stack_env = {**(os.environ if env is None else env),
                 "UWS_TASK_QUEUE": f"uws-bench-{secrets.token_hex(4)}"}
    if config is not None:
        stack_env["UWS_CONFIG"] = str(config)
    if serve_api:
        stack_env[CONSTANT_ENV] = str(constant)
    uws = UwsStack(env=stack_env, database_url=url, data_dir=data_dir,
                   temporal_address=temporal, api_argv=SERVE_API if serve_api else None,
                   logs=logs)
    stack.callback(uws.close)
    uws.start()
    bench = BenchStack(uws, logs, url, client_key, constant, accounts)
    bench.users = [bench.new_user(workspaces_per_user) for _ in range(users)]
    return bench


# --- HTTP set-up calls ----------------------------------------------------------------

def request(port: int, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request to our API on ``port``: its status and body (JSON ``body`` sent)."""
    headers = headers or {}
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers = {**headers, "Content-Type": "application/json"}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return request(port, "GET", path, None, headers)


def call_json(port: int, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, raw = request(port, method, path, body, headers)
    if status != 200:
        raise RuntimeError(f"{method} {path} answered {status}: {raw[:500]!r}")
    return json.loads(raw)


def user_token(port: int, client_key: str, name: str | None = None) -> str:
    name = name or f"bench{secrets.token_hex(4)}"
    reply = call_json(port, "POST", "/tokens/", {
        "client_token": client_key,
        "user_info": {"username": name, "email": f"{name}@example.org",
                      "first_name": "Bench", "last_name": "User"},
    })
    return reply["token"]


def create_workspace(port: int, auth: dict[str, str]) -> int:
    files = [{"name": "README.md", "content": "# bench\n"},
             {"name": "notes.txt", "content": "small file for the benchmark\n"}]
    reply = call_json(port, "POST", "/workspaces/", {
        "name": "bench", "description": "api_throughput",
        "workspace_details": {"files": files, "symlinks": []},
    }, auth)
    return reply["data"]["workspace"]["id"]


# --- wrk ------------------------------------------------------------------------------

def _apt_get(*args: str) -> int:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        return subprocess.run(["apt-get", *args], env=env, stdout=sys.stderr).returncode
    except FileNotFoundError:
        return 127


def ensure_wrk() -> str:
    """The ``wrk`` binary, installed from Debian's archive when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
    if _apt_get("install", "-y", "wrk") != 0:
        _apt_get("update")  # a fresh container has empty package lists
        _apt_get("install", "-y", "wrk")
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("this benchmark needs `wrk` (Debian/Ubuntu: apt-get install wrk); "
                         "installing it failed")
    return found


@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _percentile_ms(output: str, pct: str) -> float:
    match = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    if match is None:
        raise ValueError(f"no {pct}% latency in wrk output:\n{output}")
    return float(match[1]) * _UNITS_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s*(\d+) requests in", output, re.M)
    if rps is None or total is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     output)
    return WrkResult(
        requests=int(total[1]), rps=float(rps[1]),
        p50_ms=_percentile_ms(output, "50"), p99_ms=_percentile_ms(output, "99"),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
    )
