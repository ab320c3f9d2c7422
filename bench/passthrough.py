"""The passthrough relay against a direct connection to the same upstream.

Starts two processes: an upstream (``GET /passthrough/h/1/small``: 100 bytes,
``GET /passthrough/h/1/big``: 100 MB streamed, a WebSocket echo at ``/passthrough/h/1/ws``)
and a relay (:class:`api.passthrough.PassthroughRelay` with that upstream fixed: the
real app's access checks are not part of this measurement). Then measures, direct and
through the relay: requests/s of the small response (``wrk``), MB/s of the big download
(an httpx streaming client, 3 runs alternated, best), and WebSocket echo round trips (2000
sequential messages of 100 bytes, p50/p99).

That upstream answers a small GET in ~30 µs, so the relay's own cost dominates its ratio.
The upstream a session really is, JupyterLab, is measured too: it is started (own state and
config under a temporary directory, token auth) with another relay in front, and wrk compares
``GET /passthrough/h/1/api/status`` direct and through the relay, alternated (A B A B).
Targets are printed, not asserted; any error (non-2xx, socket error, wrong size or echo)
exits non-zero.

    .venv/bin/python bench/passthrough.py [--duration 10] [--connections 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.metadata
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # `python bench/x.py`: bench/, not the repository, is on sys.path; harness adds it
    import harness
except ModuleNotFoundError:  # `python -m bench.x`
    from bench import harness
from app.stack import HOST, Child, free_port

BASE = "/passthrough/h/1/"
SMALL_BODY = b'{"success": true, "message": "' + b"x" * 68 + b'"}'  # 100 bytes
BIG_SIZE = 100 * 1000 * 1000
CHUNK = b"\xa5" * (64 * 1024)
DOWNLOAD_RUNS = 3
WS_MESSAGES = 2000
WS_WARMUP = 100
WS_PAYLOAD = "m" * 100
WARMUP_SECONDS = 2
JUPYTER_STATUS = "api/status"  # small JSON, token-authenticated: a Jupyter handler's fixed cost
JUPYTER_ROUNDS = 2
JUPYTER_START_TIMEOUT = 90  # seconds; a loaded machine (a test run alongside) starts it slowly

ASGIApp = Callable[..., Any]


# --- the servers (child processes) --------------------------------------------------------

async def upstream_app(scope: dict[str, Any], receive: Callable[..., Any],
                       send: Callable[..., Any]) -> None:
    if scope["type"] == "http":
        if scope["path"] == BASE + "big":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream"),
                                    (b"content-length", str(BIG_SIZE).encode())]})
            sent = 0
            while sent < BIG_SIZE:
                chunk = CHUNK[: BIG_SIZE - sent]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
            await send({"type": "http.response.body", "body": b""})
            return
        found = scope["path"] == BASE + "small"
        body = SMALL_BODY if found else b"not found"
        await send({"type": "http.response.start", "status": 200 if found else 404,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": message.get("text"),
                        "bytes": message.get("bytes")})


def relay_app(upstream_port: int) -> ASGIApp:
    from api.passthrough import PassthroughRelay, Upstream

    relay = PassthroughRelay()
    upstream = Upstream(HOST, upstream_port)

    async def app(scope: dict[str, Any], receive: Callable[..., Any],
                  send: Callable[..., Any]) -> None:
        if scope["type"] == "http":
            await relay.http(scope, receive, send, upstream)
        elif scope["type"] == "websocket":
            await relay.websocket(scope, receive, send, upstream)
        elif scope["type"] == "lifespan":  # close the pooled connections on the way out
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await relay.aclose()
            await send({"type": "lifespan.shutdown.complete"})

    return app


def serve(app: ASGIApp, port: int) -> None:
    import uvicorn

    # Same defaults as the real API (uvloop, httptools when installed), minus the access log.
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


# --- measurements -------------------------------------------------------------------------

@dataclass
class Side:
    label: str
    port: int

    @property
    def http(self) -> str:
        return f"http://{HOST}:{self.port}{BASE}"

    @property
    def ws(self) -> str:
        return f"ws://{HOST}:{self.port}{BASE}ws"


@dataclass
class Result:
    rps: float = 0.0
    http_p50_ms: float = 0.0
    http_p99_ms: float = 0.0
    mb_s: float = 0.0
    mb_s_runs: tuple[float, ...] = ()
    ws_p50_ms: float = 0.0
    ws_p99_ms: float = 0.0
    # JupyterLab's /api/status: one wrk result per round.
    jupyter_runs: list[harness.WrkResult] = field(default_factory=list)

    def jupyter_mean(self, attr: str) -> float:
        return statistics.mean(getattr(run, attr) for run in self.jupyter_runs)


def run_wrk(wrk: str, side: Side, path: str, seconds: int, args: argparse.Namespace,
            headers: tuple[str, ...] = ()) -> harness.WrkResult:
    """One wrk run against ``side``'s ``BASE + path``; any non-2xx or socket error raises."""
    cmd = [wrk, "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s",
           "--latency"]
    for header in headers:
        cmd += ["-H", header]
    done = subprocess.run([*cmd, side.http + path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{side.label} {path}: wrk failed ({done.returncode}): "
                           f"{done.stderr or done.stdout}")
    parsed = harness.parse_wrk(done.stdout)
    if parsed.errors:
        raise RuntimeError(f"{side.label}: wrk saw {parsed.errors} errors:\n{done.stdout}")
    return parsed


def measure_small(wrk: str, side: Side, args: argparse.Namespace, result: Result) -> None:
    run_wrk(wrk, side, "small", WARMUP_SECONDS, args)
    parsed = run_wrk(wrk, side, "small", args.duration, args)
    result.rps, result.http_p50_ms, result.http_p99_ms = (parsed.rps, parsed.p50_ms,
                                                          parsed.p99_ms)


def measure_jupyter(wrk: str, sides: tuple[Side, ...], token: str, args: argparse.Namespace,
                    results: dict[str, Result]) -> None:
    # Both sides warmed up first (Jupyter's handlers and the relay's pool), then A B A B:
    # a neighbour's load burst hits both sides alike.
    headers = (f"Authorization: token {token}",)
    for side in sides:
        run_wrk(wrk, side, JUPYTER_STATUS, WARMUP_SECONDS, args, headers)
    for n in range(1, JUPYTER_ROUNDS + 1):
        for side in sides:
            parsed = run_wrk(wrk, side, JUPYTER_STATUS, args.duration, args, headers)
            results[side.label].jupyter_runs.append(parsed)
            print(f"  round {n} {side.label:<6} {parsed.rps:8.0f} req/s  "
                  f"p50 {parsed.p50_ms:.2f} ms  p99 {parsed.p99_ms:.2f} ms", flush=True)


async def download_mb_s(url: str) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        started = time.perf_counter()
        received = 0
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise RuntimeError(f"GET {url} answered {response.status_code}")
            async for chunk in response.aiter_raw():
                received += len(chunk)
        elapsed = time.perf_counter() - started
    if received != BIG_SIZE:
        raise RuntimeError(f"GET {url}: {received} bytes instead of {BIG_SIZE}")
    return BIG_SIZE / elapsed / 1e6


async def ws_round_trips_ms(url: str) -> list[float]:
    from websockets.asyncio.client import connect

    times: list[float] = []
    async with connect(url, compression=None, proxy=None) as ws:
        for n in range(WS_WARMUP + WS_MESSAGES):
            started = time.perf_counter_ns()
            await ws.send(WS_PAYLOAD)
            echoed = await ws.recv()
            if n >= WS_WARMUP:
                times.append((time.perf_counter_ns() - started) / 1e6)
            if echoed != WS_PAYLOAD:
                raise RuntimeError(f"{url}: the echo differs from what was sent")
    return times


async def measure_async(sides: tuple[Side, ...], results: dict[str, Result]) -> None:
    # Alternated (A B A B A B): a neighbour's load burst hits both sides alike. Best of 3:
    # other processes can only slow a run down.
    runs: dict[str, list[float]] = {side.label: [] for side in sides}
    for _ in range(DOWNLOAD_RUNS):
        for side in sides:
            runs[side.label].append(await download_mb_s(side.http + "big"))
    for side in sides:
        result = results[side.label]
        result.mb_s_runs = tuple(runs[side.label])
        result.mb_s = max(runs[side.label])
        times = await ws_round_trips_ms(side.ws)
        result.ws_p50_ms = harness.percentile(times, 50)
        result.ws_p99_ms = harness.percentile(times, 99)


# --- orchestration ------------------------------------------------------------------------

@contextlib.contextmanager
def child(args: list[str], port: int, log: Path) -> Iterator[Child]:
    """``python -m bench.passthrough ARGS`` (its own session: Ctrl-C reaches only us, and we
    stop it ourselves), once it listens on ``port``."""
    proc = Child(args[0], [sys.executable, "-m", "bench.passthrough", *args], log)
    proc.start()
    try:
        proc.wait_for_port(port, timeout=30)
        yield proc
    finally:
        proc.stop(timeout=15)


def jupyter_status(port: int, token: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", BASE + JUPYTER_STATUS, headers={"Authorization": f"token {token}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@contextlib.contextmanager
def jupyter_lab(port: int, token: str, tmp: Path, log: Path) -> Iterator[bytes]:
    """A JupyterLab serving under ``BASE`` on ``port``, flags as the real session job starts
    it (controllers/job_types/jupyter_lab.py); yields its /api/status body once it answers."""
    state = tmp / "jupyter"
    root = state / "root"
    root.mkdir(parents=True)
    # Jupyter's and IPython's state under the temp dir: nothing touches the real home.
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
           "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_DATA_DIR": str(state / "data"),
           "IPYTHONDIR": str(state / "ipython")}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ip={HOST}",
           f"--port={port}", "--port-retries=0", f"--ServerApp.token={token}",
           f"--ServerApp.base_url={BASE}", f"--ServerApp.root_dir={root}",
           "--ServerApp.allow_remote_access=True", "--ServerApp.trust_xheaders=True",
           "--allow-root"]  # needed when run as root (a container), ignored otherwise
    # Own session, like child(): Ctrl-C reaches only us, and stop() ends its group.
    proc = Child("jupyterlab", cmd, log, env=env, cwd=root)
    proc.start()
    try:
        # Listening is not enough: the extensions load after the port opens.
        deadline = time.monotonic() + JUPYTER_START_TIMEOUT
        while True:
            if not proc.alive:
                assert proc.popen is not None
                raise RuntimeError(f"JupyterLab exited with code {proc.popen.returncode}")
            try:
                status, body = jupyter_status(port, token)
                if status == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer {JUPYTER_STATUS} within "
                                   f"{JUPYTER_START_TIMEOUT} s")
            time.sleep(0.3)
        yield body
    finally:
        proc.stop(timeout=15)


def print_report(direct: Result, relayed: Result, jupyter_body: bytes,
                 args: argparse.Namespace) -> None:
    jl = f"JupyterLab /{JUPYTER_STATUS}"
    rows = [
        ("trivial upstream: small GET req/s (wrk)", direct.rps, relayed.rps, "{:.0f}"),
        ("trivial upstream: small GET p50 ms", direct.http_p50_ms, relayed.http_p50_ms,
         "{:.2f}"),
        ("trivial upstream: small GET p99 ms", direct.http_p99_ms, relayed.http_p99_ms,
         "{:.2f}"),
        ("100 MB download MB/s (best of 3)", direct.mb_s, relayed.mb_s, "{:.0f}"),
        ("WebSocket echo p50 ms", direct.ws_p50_ms, relayed.ws_p50_ms, "{:.3f}"),
        ("WebSocket echo p99 ms", direct.ws_p99_ms, relayed.ws_p99_ms, "{:.3f}"),
        (f"{jl} req/s (wrk, mean of {JUPYTER_ROUNDS})", direct.jupyter_mean("rps"),
         relayed.jupyter_mean("rps"), "{:.0f}"),
        (f"{jl} p50 ms", direct.jupyter_mean("p50_ms"), relayed.jupyter_mean("p50_ms"),
         "{:.2f}"),
        (f"{jl} p99 ms", direct.jupyter_mean("p99_ms"), relayed.jupyter_mean("p99_ms"),
         "{:.2f}"),
    ]
    width = max(len(label) for label, *_ in rows)
    print(f"\n{'measure':<{width}} {'direct':>10} {'relay':>10}")
    for label, a, b, fmt in rows:
        print(f"{label:<{width}} {fmt.format(a):>10} {fmt.format(b):>10}")
    for label, result in (("direct", direct), ("relay", relayed)):
        print(f"  {label} download runs MB/s: "
              f"{', '.join(f'{v:.0f}' for v in result.mb_s_runs)} "
              f"(median {statistics.median(result.mb_s_runs):.0f})")
    for label, result in (("direct", direct), ("relay", relayed)):
        print(f"  {label} {jl} rounds req/s: "
              f"{', '.join(f'{run.rps:.0f}' for run in result.jupyter_runs)}")
    rps_ratio = relayed.rps / direct.rps
    jl_ratio = relayed.jupyter_mean("rps") / direct.jupyter_mean("rps")
    mb_ratio = relayed.mb_s / direct.mb_s
    added_p50 = relayed.ws_p50_ms - direct.ws_p50_ms
    added_p99 = relayed.ws_p99_ms - direct.ws_p99_ms
    print(f"\nrelay/direct small req/s, trivial upstream: {rps_ratio:.2f}   (target >= 0.70: "
          f"{'met' if rps_ratio >= 0.7 else 'NOT met'})")
    print(f"relay/direct small req/s, {jl}: {jl_ratio:.2f}   (target >= 0.70: "
          f"{'met' if jl_ratio >= 0.7 else 'NOT met'})")
    print(f"relay/direct download MB/s: {mb_ratio:.2f}   (target >= 0.70: "
          f"{'met' if mb_ratio >= 0.7 else 'NOT met'})")
    print(f"WebSocket added latency: p50 {added_p50:+.3f} ms (target < 1 ms: "
          f"{'met' if added_p50 < 1 else 'NOT met'}), p99 {added_p99:+.3f} ms")
    for metric, value, unit in (
            ("relay/direct small req/s, trivial upstream", rps_ratio, "ratio"),
            (f"relay/direct small req/s, {jl}", jl_ratio, "ratio"),
            ("relay/direct download MB/s", mb_ratio, "ratio"),
            ("WebSocket added latency p50", added_p50, "ms"),
            ("WebSocket added latency p99", added_p99, "ms"),
            ("relay download", relayed.mb_s, "MB/s"),
            ("relay small GET, trivial upstream", relayed.rps, "req/s")):
        harness.emit("passthrough", metric, value, unit)
    print(f"\nwrk: {args.connections} connections, {args.threads} threads, "
          f"{args.duration} s after {WARMUP_SECONDS} s warm-up; {os.cpu_count()} CPUs shared "
          "by wrk, the upstream and the relay (one uvicorn process each).")
    print(f"JupyterLab {importlib.metadata.version('jupyterlab')} (jupyter_server "
          f"{importlib.metadata.version('jupyter_server')}, one Tornado process): "
          f"/{JUPYTER_STATUS} answers {len(jupyter_body)} bytes of JSON, token in the "
          "Authorization header; measured after the trivial upstream and its relay stopped.")
    print("Relay: PassthroughRelay with the upstream fixed; the real app's routing, "
          "authentication and access checks are not part of this measurement.")


def run(args: argparse.Namespace) -> int:
    wrk = harness.ensure_wrk()
    upstream_port = args.upstream_port or free_port()
    relay_port = args.relay_port or free_port()
    with tempfile.TemporaryDirectory(prefix="uws-bench-") as tmp:
        log = Path(tmp) / "servers.log"
        try:
            with (child(["serve-upstream", "--port", str(upstream_port)], upstream_port, log),
                  child(["serve-relay", "--port", str(relay_port),
                         "--upstream-port", str(upstream_port)], relay_port, log)):
                sides = (Side("direct", upstream_port), Side("relay", relay_port))
                results = {side.label: Result() for side in sides}
                for side in sides:
                    print(f"{side.label}: wrk on the small response ...", flush=True)
                    measure_small(wrk, side, args, results[side.label])
                print("downloads (direct and relay alternated), WebSocket echoes ...",
                      flush=True)
                asyncio.run(measure_async(sides, results))
            # The real upstream, with the trivial one stopped: its own relay in front.
            jupyter_port, jupyter_relay_port = free_port(), free_port()
            token = secrets.token_hex(24)
            print("JupyterLab: starting ...", flush=True)
            with (jupyter_lab(jupyter_port, token, Path(tmp), log) as jupyter_body,
                  child(["serve-relay", "--port", str(jupyter_relay_port),
                         "--upstream-port", str(jupyter_port)], jupyter_relay_port, log)):
                print(f"JupyterLab: wrk on /{JUPYTER_STATUS}, direct and relay alternated ...",
                      flush=True)
                measure_jupyter(wrk, (Side("direct", jupyter_port),
                                      Side("relay", jupyter_relay_port)), token, args, results)
        except Exception:
            harness.print_log_tails(Path(tmp), lines=30)
            raise
        print_report(results["direct"], results["relay"], jupyter_body, args)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    upstream = sub.add_parser("serve-upstream", help="(internal) the upstream server")
    upstream.add_argument("--port", type=int, required=True)
    relay = sub.add_parser("serve-relay", help="(internal) the relay server")
    relay.add_argument("--port", type=int, required=True)
    relay.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per side")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--upstream-port", type=int, default=0, help="default: a free one")
    parser.add_argument("--relay-port", type=int, default=0, help="default: a free one")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.command == "serve-upstream":
        serve(upstream_app, args.port)
        return 0
    if args.command == "serve-relay":
        serve(relay_app(args.upstream_port), args.port)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
