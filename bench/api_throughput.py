"""Throughput of authenticated ``GET /workspaces/{id}/`` against a constant of the same size.

Starts its own PostgreSQL database, Temporal dev server, worker and one API process
(``python -m bench.serve_api``), creates a user and a workspace, then drives both endpoints
with ``wrk`` in alternation (A B A B), once with the default token cache and once with
``UWS_TOKEN_CACHE_SECONDS=0``. Exits non-zero on any error (non-2xx/3xx or socket error);
the throughput ratio is reported, not asserted.

    .venv/bin/python bench/api_throughput.py [--duration 10] [--connections 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.devstack import (
    embedded_database_url,
    start_temporal_dev_server,
    stop_process,
    wait_for_port,
)
from core.settings import Settings

try:
    from bench.report import emit
except ModuleNotFoundError:  # run as a script: bench/ is first on sys.path
    from report import emit  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LOCAL_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
CONSTANT_PATH = "/bench/constant/"
WARMUP_SECONDS = 2
ROUNDS = 2
DEFAULT_CACHE = Settings.model_fields["token_cache_seconds"].default


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


@dataclass(frozen=True)
class Target:
    label: str
    url: str
    headers: tuple[str, ...] = ()


def run_wrk(wrk: str, target: Target, seconds: int, args: argparse.Namespace) -> WrkResult:
    cmd = [wrk, "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s",
           "--latency"]
    for header in target.headers:
        cmd += ["-H", header]
    done = subprocess.run([*cmd, target.url], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# --- services -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


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
    if not _listening(5432):
        yield embedded_database_url(tmp / "embedded", database="uws_bench")
        return
    name = f"uws_bench_{secrets.token_hex(6)}"
    asyncio.run(_admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@{HOST}:5432/{name}"
    finally:
        asyncio.run(_admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _prepare_database(url: str, log: Path) -> str:
    """Migrate, then create an api client; its key."""
    from db.accounts import create_client
    from db.engine import close_engine, ensure_database, migrate, open_engine

    await ensure_database(url)
    with log.open("a") as out, contextlib.redirect_stdout(out):  # Piccolo prints progress
        await migrate(url)
    engine = await open_engine(url, min_size=1, max_size=2)
    try:
        return await create_client(f"bench-portal-{secrets.token_hex(4)}")
    finally:
        await close_engine(engine)


def start_child(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Own session: Ctrl-C reaches only us, and we stop children in order.
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


class ApiServer:
    """``python -m bench.serve_api`` on a fixed port, restartable with other settings."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, extra_env: dict[str, str]) -> None:
        self.stop()
        env = {**self.env, **extra_env}
        self.proc = start_child([sys.executable, "-m", "bench.serve_api"], env, self.log)
        wait_for_port(HOST, self.port, timeout=60, proc=self.proc, what="bench.serve_api")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


# --- HTTP set-up calls ----------------------------------------------------------------

def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return _http(port, "GET", path, None, headers or {})


def _http(port: int, method: str, path: str, body: Any, headers: dict[str, str]
          ) -> tuple[int, bytes]:
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


def call_json(port: int, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, raw = _http(port, method, path, body, headers or {})
    if status != 200:
        raise RuntimeError(f"{method} {path} answered {status}: {raw[:500]!r}")
    return json.loads(raw)


def user_token(port: int, client_key: str) -> str:
    name = f"bench{secrets.token_hex(4)}"
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


def wait_for_rescan(port: int, path: str, auth: dict[str, str], timeout: float = 60) -> bytes:
    """The workspace body once the worker's scan has filled ``current_workspace_details``
    and it no longer changes (what wrk reads must stay the same size)."""
    deadline = time.monotonic() + timeout
    previous = b""
    while time.monotonic() < deadline:
        status, raw = http_get(port, path, auth)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {raw[:500]!r}")
        workspace = json.loads(raw)["data"]["workspaces"][0]
        scanned = workspace["workspace_details"]["current_workspace_details"].get("files")
        if scanned and raw == previous:
            return raw
        previous = raw if scanned else b""
        time.sleep(0.5)
    raise RuntimeError(f"the rescan did not fill current_workspace_details in {timeout:.0f}s")


def check_same_size(port: int, workspace_path: str, auth: dict[str, str]) -> None:
    sizes = {}
    for label, path, headers in (("authenticated", workspace_path, auth),
                                 ("constant", CONSTANT_PATH, {})):
        status, raw = http_get(port, path, headers)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {raw[:500]!r}")
        sizes[label] = len(raw)
    print(f"body bytes: authenticated {sizes['authenticated']}, constant {sizes['constant']}")
    if sizes["authenticated"] != sizes["constant"]:
        raise RuntimeError("the two endpoints return bodies of different sizes")


# --- the measurement ------------------------------------------------------------------

@dataclass
class Row:
    label: str
    runs: list[WrkResult]

    def mean(self, attr: str) -> float:
        return sum(getattr(r, attr) for r in self.runs) / len(self.runs)

    def total(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.runs)


def measure(wrk: str, pair: tuple[Target, Target], args: argparse.Namespace
            ) -> tuple[list[Row], int]:
    """Warm-up, then A B A B; the rows and the errors seen during warm-up."""
    warmup_errors = 0
    for target in pair:
        warmup_errors += run_wrk(wrk, target, WARMUP_SECONDS, args).errors
    rows = [Row(t.label, []) for t in pair]
    for n in range(1, ROUNDS + 1):
        for target, row in zip(pair, rows, strict=True):
            result = run_wrk(wrk, target, args.duration, args)
            row.runs.append(result)
            print(f"  round {n} {target.label:<34} {result.rps:9.1f} req/s  "
                  f"errors {result.errors}", flush=True)
    return rows, warmup_errors


def print_table(rows: list[Row]) -> None:
    print(f"\n{'endpoint':<36} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'non-2xx':>8} {'sock err':>9}")
    for row in rows:
        print(f"{row.label:<36} {row.mean('rps'):9.1f} {row.mean('p50_ms'):8.2f} "
              f"{row.mean('p99_ms'):8.2f} {row.total('non_2xx'):8d} "
              f"{row.total('socket_errors'):9d}")
    print("(req/s, p50 and p99: mean of rounds; errors: sum of rounds)")


def _raise_on_sigterm() -> None:
    def handler(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _print_log_tails(logs: Path, lines: int = 15) -> None:
    for log in sorted(logs.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            print(f"--- last lines of {log.name}", *tail, sep="\n", file=sys.stderr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk round")
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    return parser.parse_args()


def run(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> int:
    wrk = ensure_wrk()
    logs = tmp / "logs"
    logs.mkdir()
    try:
        return _run(args, wrk, tmp, logs, stack)
    except Exception:
        _print_log_tails(logs)
        raise


def _run(args: argparse.Namespace, wrk: str, tmp: Path, logs: Path,
         stack: contextlib.ExitStack) -> int:
    url = stack.enter_context(database(tmp))
    client_key = asyncio.run(_prepare_database(url, logs / "migrate.log"))

    temporal_port = free_port()
    temporal = start_temporal_dev_server(tmp / "temporal", host=HOST, port=temporal_port,
                                         ui_port=free_port())
    stack.callback(stop_process, temporal)

    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "UWS_TOKEN_CACHE_SECONDS"}
    env.update(UWS_DATABASE_URL=url, UWS_TEMPORAL_ADDRESS=f"{HOST}:{temporal_port}",
               UWS_DATA_DIR=str(tmp / "data"), UWS_TASK_QUEUE=f"uws-bench-{secrets.token_hex(4)}",
               UWS_HOST=HOST, UWS_PORT=str(api_port),
               UWS_BENCH_CONSTANT_FILE=str(tmp / "constant.json"))
    worker = start_child([sys.executable, "-m", "app.cli", "worker"], env, logs / "worker.log")
    stack.callback(stop_process, worker)

    # First start with a placeholder constant: the API must run to create the workspace.
    (tmp / "constant.json").write_text("{}")
    api = ApiServer(env, api_port, logs / "serve_api.log")
    stack.callback(api.stop)
    api.start({})
    token = user_token(api_port, client_key)
    auth = {"UWS-Authorization": f"Token {token}"}
    workspace_path = f"/workspaces/{create_workspace(api_port, auth)}/"
    (tmp / "constant.json").write_bytes(wait_for_rescan(api_port, workspace_path, auth))

    base = f"http://{HOST}:{api_port}"
    constant = Target("GET /bench/constant/", base + CONSTANT_PATH)
    rows: list[Row] = []
    ratios: list[tuple[str, float]] = []
    errors = 0
    for cache_label, extra in ((f"cache {DEFAULT_CACHE:g}s", {}),
                               ("cache 0", {"UWS_TOKEN_CACHE_SECONDS": "0"})):
        api.start(extra)  # a restart also loads the constant file written above
        print(f"\ntoken {cache_label}:")
        check_same_size(api_port, workspace_path, auth)
        authed = Target(f"GET /workspaces/{{id}}/ ({cache_label})", base + workspace_path,
                        (f"UWS-Authorization: Token {token}",))
        pair_rows, warmup_errors = measure(wrk, (authed, constant), args)
        rows += pair_rows
        ratios.append((cache_label, pair_rows[0].mean("rps") / pair_rows[1].mean("rps")))
        for row in pair_rows:
            tag = "" if cache_label in row.label else f" (server: token {cache_label})"
            emit("api_throughput", f"{row.label}{tag} req/s", row.mean("rps"), "req/s")
            emit("api_throughput", f"{row.label}{tag} p50", row.mean("p50_ms"), "ms")
            emit("api_throughput", f"{row.label}{tag} p99", row.mean("p99_ms"), "ms")
        errors += warmup_errors + sum(r.total("non_2xx") + r.total("socket_errors")
                                      for r in pair_rows)
        if warmup_errors:
            print(f"  warm-up errors: {warmup_errors}")

    print_table(rows)
    for cache_label, ratio in ratios:
        print(f"ratio authenticated/constant = {ratio:.2f}  (token {cache_label})")
        emit("api_throughput", f"authenticated/constant req/s (token {cache_label})", ratio,
             "ratio")
    print(f"errors = {errors}")
    emit("api_throughput", "errors", errors, "count")
    return 1 if errors else 0


def print_machine() -> None:
    """CPUs and load: the machine is shared, so every figure is read against them."""
    load1, load5, load15 = os.getloadavg()
    print(f"cpus: {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}); "
          f"load average at start: {load1:.2f} {load5:.2f} {load15:.2f}", flush=True)


def run_with_cleanup(run: Any, args: argparse.Namespace) -> int:
    """Run ``run(args, tmp, stack)``; whatever it started is stopped on every exit."""
    _raise_on_sigterm()
    try:
        with tempfile.TemporaryDirectory(prefix="uws-bench-") as tmp, \
                contextlib.ExitStack() as stack:
            return run(args, Path(tmp), stack)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130


def main() -> int:
    args = parse_args()
    print_machine()
    print(f"wrk: {args.connections} connections, {args.threads} threads, "
          f"{ROUNDS} rounds x {args.duration}s per endpoint, {WARMUP_SECONDS}s warm-up")
    return run_with_cleanup(run, args)


if __name__ == "__main__":
    sys.exit(main())
