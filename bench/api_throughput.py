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
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:  # `python bench/x.py`: bench/, not the repository, is on sys.path; harness adds it
    import harness
except ModuleNotFoundError:  # `python -m bench.x`
    from bench import harness
from core.settings import Settings

CONSTANT_PATH = "/bench/constant/"
WARMUP_SECONDS = 2
ROUNDS = 2
DEFAULT_CACHE = Settings.model_fields["token_cache_seconds"].default


# --- wrk ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    label: str
    url: str
    headers: tuple[str, ...] = ()


def run_wrk(wrk: str, target: Target, seconds: int, args: argparse.Namespace
            ) -> harness.WrkResult:
    cmd = [wrk, "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s",
           "--latency"]
    for header in target.headers:
        cmd += ["-H", header]
    done = subprocess.run([*cmd, target.url], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return harness.parse_wrk(done.stdout)


# --- what wrk reads -------------------------------------------------------------------

def wait_for_rescan(port: int, path: str, auth: dict[str, str], timeout: float = 60) -> bytes:
    """The workspace body once the worker's scan has filled ``current_workspace_details``
    and it no longer changes (what wrk reads must stay the same size)."""
    deadline = time.monotonic() + timeout
    previous = b""
    while time.monotonic() < deadline:
        status, raw = harness.http_get(port, path, auth)
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
        status, raw = harness.http_get(port, path, headers)
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
    runs: list[harness.WrkResult]

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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk round")
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    return parser.parse_args()


def run(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> int:
    wrk = harness.ensure_wrk()
    # The default token cache unless a measurement sets it.
    env = {k: v for k, v in os.environ.items() if k != "UWS_TOKEN_CACHE_SECONDS"}
    # The API starts with a placeholder constant: it must run to create the workspace.
    st = harness.start_stack(stack, tmp, env=env, users=1, workspaces_per_user=1)
    user = st.users[0]
    api_port, token, auth = st.api_port, user.token, user.auth
    workspace_path = f"/workspaces/{user.workspaces[0]}/"
    st.constant_file.write_bytes(wait_for_rescan(api_port, workspace_path, auth))

    base = st.api_url
    constant = Target("GET /bench/constant/", base + CONSTANT_PATH)
    rows: list[Row] = []
    ratios: list[tuple[str, float]] = []
    errors = 0
    for cache_label, extra in ((f"cache {DEFAULT_CACHE:g}s", {}),
                               ("cache 0", {"UWS_TOKEN_CACHE_SECONDS": "0"})):
        st.restart_api(extra)  # a restart also loads the constant file written above
        print(f"\ntoken {cache_label}:")
        check_same_size(api_port, workspace_path, auth)
        authed = Target(f"GET /workspaces/{{id}}/ ({cache_label})", base + workspace_path,
                        (f"UWS-Authorization: Token {token}",))
        pair_rows, warmup_errors = measure(wrk, (authed, constant), args)
        rows += pair_rows
        ratios.append((cache_label, pair_rows[0].mean("rps") / pair_rows[1].mean("rps")))
        for row in pair_rows:
            tag = "" if cache_label in row.label else f" (server: token {cache_label})"
            harness.emit("api_throughput", f"{row.label}{tag} req/s", row.mean("rps"), "req/s")
            harness.emit("api_throughput", f"{row.label}{tag} p50", row.mean("p50_ms"), "ms")
            harness.emit("api_throughput", f"{row.label}{tag} p99", row.mean("p99_ms"), "ms")
        errors += warmup_errors + sum(r.total("non_2xx") + r.total("socket_errors")
                                      for r in pair_rows)
        if warmup_errors:
            print(f"  warm-up errors: {warmup_errors}")

    print_table(rows)
    for cache_label, ratio in ratios:
        print(f"ratio authenticated/constant = {ratio:.2f}  (token {cache_label})")
        harness.emit("api_throughput", f"authenticated/constant req/s (token {cache_label})",
                     ratio, "ratio")
    print(f"errors = {errors}")
    harness.emit("api_throughput", "errors", errors, "count")
    return 1 if errors else 0


def main() -> int:
    args = parse_args()
    harness.print_machine()
    print(f"wrk: {args.connections} connections, {args.threads} threads, "
          f"{ROUNDS} rounds x {args.duration}s per endpoint, {WARMUP_SECONDS}s warm-up")
    return harness.run_with_cleanup(run, args)


if __name__ == "__main__":
    sys.exit(main())
