"""Sustained job starts: ``--clients`` clients each start a LocalTestJob, wait for its
``running`` event on their owner's ``/jobs/`` socket, and start the next, for
``--duration`` seconds. Prints the starts per second that reached ``running`` and the
start -> running latency (p50, p99), so a regression in the start path shows as a number.

Starts its own stack (``bench.jobs_latency.start_stack``, over ``bench.harness``:
PostgreSQL, the Temporal dev server, a worker and an API, each its own process). Every job
must end ``complete``; the exit status is non-zero when one did not.

    .venv/bin/python bench/start_rate.py [--clients 50] [--duration 60] [--job-seconds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

import httpx

try:  # `python bench/x.py`: bench/, not the repository, is on sys.path; harness adds it
    import harness
except ModuleNotFoundError:  # `python -m bench.x`
    from bench import harness
from app.stack import HOST
from bench.jobs_latency import (
    TERMINAL,
    Events,
    Job,
    Stack,
    final_check,
    sockets,
    start_job,
    start_stack,
    time_limit_for,
)

RUNNING_TIMEOUT_S = 60.0


async def client_loop(n: int, client: httpx.AsyncClient, st: Stack, events: Events,
                      args: argparse.Namespace, until: float, jobs: list[Job],
                      latencies: list[float], failures: list[str]) -> None:
    user = st.users[n % len(st.users)]
    workspace = user.workspaces[(n // len(st.users)) % len(user.workspaces)]
    while time.monotonic() < until:
        try:
            job = await start_job(client, user, workspace, args.job_seconds,
                                  time_limit_for(args.job_seconds))
        except Exception as exc:  # a refusal is a result here, reported below
            failures.append(f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(0.5)
            continue
        jobs.append(job)
        deadline = time.monotonic() + RUNNING_TIMEOUT_S
        while time.monotonic() < deadline:
            seen = events.at(job.id, "running") or next(
                (events.at(job.id, s) for s in TERMINAL if events.at(job.id, s)), None)
            if seen is not None:
                latencies.append(seen - job.sent)
                break
            await asyncio.sleep(0.005)
        else:
            failures.append(f"job {job.id} not running after {RUNNING_TIMEOUT_S:g}s")


async def measure(st: Stack, args: argparse.Namespace) -> int:
    events = Events()
    jobs: list[Job] = []
    latencies: list[float] = []
    failures: list[str] = []
    # Idle connections are dropped before uvicorn closes them (after 5 s): a start sent
    # on a connection the server is closing at that moment fails, and is not retried.
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients,
                          keepalive_expiry=4.0)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{st.api_port}", timeout=60,
                                 limits=limits) as client, sockets(st.api_port, st.users, events):
        print(f"\n{args.clients} clients starting jobs of {args.job_seconds:g}s for "
              f"{args.duration:g}s", flush=True)
        began = time.monotonic()
        until = began + args.duration
        await asyncio.gather(*(client_loop(n, client, st, events, args, until, jobs,
                                           latencies, failures)
                               for n in range(args.clients)))
        elapsed = time.monotonic() - began
        ended = await events.wait_all([j.id for j in jobs], TERMINAL,
                                      timeout=args.job_seconds + 120)
        not_listed = await final_check(client, jobs)

    rate = len(latencies) / elapsed
    print(f"\nstarts that reached running: {len(latencies)} in {elapsed:.1f}s = "
          f"{rate:.1f}/s ({len(failures)} failures)")
    if latencies:
        p50, p99 = harness.percentile(latencies, 50), harness.percentile(latencies, 99)
        print(f"start -> running: p50 {p50:.3f}s  p99 {p99:.3f}s  max {max(latencies):.3f}s")
        harness.emit("start_rate", "start -> running p50", p50, "s")
        harness.emit("start_rate", "start -> running p99", p99, "s")
    harness.emit("start_rate", "sustained starts", rate, "per s")
    for failure in failures[:5]:
        print(f"  failure: {failure}")
    bad = len(failures) + len(not_listed) + (0 if ended else 1)
    print(f"every job ended: {'yes' if ended and not not_listed else 'NO'}")
    harness.emit("start_rate", "failures", bad, "count")
    return 1 if bad else 0


def run(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> int:
    st = start_stack(tmp, stack)
    status = asyncio.run(measure(st, args))
    if status:
        harness.print_log_tails(st.logs)
    return status


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--job-seconds", type=float, default=1.0)
    return harness.checked_args(parser, at_least_one=("--clients",), positive=("--duration",))


if __name__ == "__main__":
    sys.exit(harness.run_bench(run, parse_args))
