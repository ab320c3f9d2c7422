"""Job status latency over the ``/jobs/`` WebSocket, and what 200 running jobs cost.

Starts its own PostgreSQL database, Temporal dev server, worker and API
(``bench.harness.start_stack``), with a copy of ``config.toml`` whose ``local_test_job``
sleeps 1 s by default (each request sets ``duration_seconds`` anyway). Then, with one
``/jobs/`` socket per user opened before the first start:

1. ``--jobs`` LocalTestJobs of ``--duration`` s, started one after another ``--gap`` s
   apart: the time from sending ``PUT /workspaces/{id}/start/`` to the ``running`` event,
   and from the process's exit (``ended_at`` in the local resource's ``ended.json``) to
   the ``complete`` event.
   Rows indented under a latency split it at the process start (``started_at`` in its
   ``started.json``). Both are the supervisor's clock, in the server's own state
   ``<data dir>/local-jobs/<job id>/``, not files of the job's directory.
2. ``--concurrent`` jobs of ``--hold`` s across several users and workspaces: the rate of
   the start endpoint, then, once all of them run, the CPU time of the worker process and
   of the Temporal dev server over ``--window`` s (set against 5 s with no job active),
   then whether every job completes (on the sockets and in ``GET /jobs/?status=complete``).

Targets are printed, not asserted; the exit status is non-zero only when a job did not
complete.

    .venv/bin/python bench/jobs_latency.py [--jobs 40] [--concurrent 200] [--hold 60]
                                           [--window 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

try:  # `python bench/x.py`: bench/, not the repository, is on sys.path; harness adds it
    import harness
except ModuleNotFoundError:  # `python -m bench.x`
    from bench import harness
from app.stack import HOST
from controllers.resources.local.resource import ENDED, STARTED

try:
    import psutil
except ImportError:  # not a dependency of the project: /proc says the same
    psutil = None

USERS = 4  # phase 2 spreads jobs over users and workspaces so no one owner matters
WORKSPACES_PER_USER = 2
START_CONCURRENCY = 8  # start requests in flight at once in phase 2
TERMINAL = ("complete", "failed")
SOCKET_SETTLE_S = 1.0  # a socket subscribes only after its token lookup, after accept
IDLE_WINDOW_S = 5.0

# The targets of the start-latency work (0.24 s was the reference's start -> running).
TARGET_START_RUNNING_P50 = 0.1
TARGET_EXIT_COMPLETE_P50 = 0.1
TARGET_MANY_RUNNING_P50, TARGET_MANY_RUNNING_P99 = 2.0, 4.0  # 200 started at once
TARGET_CORES = 0.5


# --- set-up ---------------------------------------------------------------------------

Stack = harness.BenchStack


def start_stack(tmp: Path, stack: contextlib.ExitStack) -> Stack:
    """The stack with ``USERS`` users of ``WORKSPACES_PER_USER`` workspaces each, on the
    local test job's config (``harness.local_test_config``)."""
    config = harness.local_test_config(tmp / "config.toml")
    return harness.start_stack(stack, tmp, config=config, users=USERS,
                               workspaces_per_user=WORKSPACES_PER_USER)


def state_dir(data_dir: Path, job_id: int) -> Path:
    """Where the local resource's supervisor records job ``job_id`` (server state)."""
    return data_dir / "local-jobs" / str(job_id)


# --- events from the sockets ----------------------------------------------------------

class Events:
    """The first arrival time (``time.time()``) of each status of each job."""

    def __init__(self) -> None:
        self.first: dict[int, dict[str, float]] = {}

    def record(self, raw: str | bytes) -> None:
        now = time.time()
        event = json.loads(raw)
        self.first.setdefault(event["id"], {}).setdefault(event["status"], now)

    def at(self, job_id: int, status: str) -> float | None:
        return self.first.get(job_id, {}).get(status)

    def reached(self, job_id: int, statuses: Iterable[str]) -> bool:
        seen = self.first.get(job_id, {})
        return any(s in seen for s in statuses)

    def count(self, ids: Iterable[int], statuses: Iterable[str]) -> int:
        wanted = tuple(statuses)
        return sum(self.reached(i, wanted) for i in ids)

    async def wait_all(self, ids: list[int], statuses: Iterable[str], timeout: float,
                       also: Callable[[], bool] = lambda: False) -> bool:
        """Whether every job reached one of ``statuses`` (or ``also()`` held) in time.
        Polling is fine: the arrival times are taken when messages come, not here."""
        wanted = tuple(statuses)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.reached(i, wanted) for i in ids) or also():
                return True
            await asyncio.sleep(0.1)
        return False


async def listen(socket: ClientConnection, events: Events) -> None:
    async for message in socket:
        events.record(message)


@contextlib.asynccontextmanager
async def sockets(port: int, users: list[harness.User], events: Events) -> AsyncIterator[None]:
    """One ``/jobs/`` socket per user, read into ``events`` until the block ends."""
    async with contextlib.AsyncExitStack() as stack:
        tasks = []
        for user in users:
            socket = await stack.enter_async_context(
                ws_connect(f"ws://{HOST}:{port}/jobs/?token={user.token}", max_size=None))
            tasks.append(asyncio.create_task(listen(socket, events)))
        await asyncio.sleep(SOCKET_SETTLE_S)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()


# --- jobs -----------------------------------------------------------------------------

@dataclass
class Job:
    id: int
    user: harness.User
    workspace_id: int
    sent: float
    answered: float


@dataclass
class StartFailure:
    workspace_id: int
    error: str


async def start_job(client: httpx.AsyncClient, user: harness.User, workspace_id: int,
                    seconds: float, time_limit_min: int) -> Job:
    body = {"job_type": harness.JOB_TYPE, "job_details": {"duration_seconds": seconds},
            "resource_options": {"time_limit_min": time_limit_min}}
    sent = time.time()
    response = await client.put(f"/workspaces/{workspace_id}/start/", json=body,
                                headers=user.auth)
    answered = time.time()
    if response.status_code != 200:
        raise RuntimeError(f"start answered {response.status_code}: {response.text[:300]}")
    return Job(response.json()["data"]["job"]["id"], user, workspace_id, sent, answered)


def time_limit_for(seconds: float) -> int:
    # A limit that never cuts a job short, yet ends one left behind by a crashed run.
    return min(480, math.ceil(seconds / 60) + 2)


def started_at(data_dir: Path, job: Job) -> float | None:
    """When the job's process started (``started.json``), by the supervisor's clock."""
    record = harness.read_record(state_dir(data_dir, job.id) / STARTED)
    # A supervisor that could not isolate the job records a start with no job (pid 0).
    if record is None or not record.get("job_pid"):
        return None
    return float(record["started_at"])


def ended_at(data_dir: Path, job: Job) -> float | None:
    """When the job's process exited (``ended.json``), by the supervisor's clock."""
    record = harness.read_record(state_dir(data_dir, job.id) / ENDED)
    return float(record["ended_at"]) if record is not None else None


async def final_check(client: httpx.AsyncClient, jobs: list[Job]) -> dict[int, str]:
    """Jobs that ``GET /jobs/?status=complete`` does not list, with their status."""
    complete: set[int] = set()
    for user in {id(j.user): j.user for j in jobs}.values():
        response = await client.get("/jobs/", params={"status": "complete"}, headers=user.auth)
        response.raise_for_status()
        complete |= {row["id"] for row in response.json()["data"]["jobs"]}
    missing = {}
    for job in jobs:
        if job.id not in complete:
            response = await client.get(f"/jobs/{job.id}/", headers=job.user.auth)
            rows = response.json()["data"]["jobs"]
            missing[job.id] = rows[0]["status"] if rows else "not found"
    return missing


# --- numbers --------------------------------------------------------------------------

@dataclass
class Series:
    label: str
    values: list[float] = field(default_factory=list)
    missing: int = 0
    target: float | None = None  # for p50, in seconds
    target_p99: float | None = None

    def pct(self, p: float) -> float:
        return harness.percentile(self.values, p)


def series(label: str, jobs: list[Job], value: Callable[[Job], float | None],
           target: float | None = None, target_p99: float | None = None) -> Series:
    out = Series(label, target=target, target_p99=target_p99)
    for job in jobs:
        v = value(job)
        if v is None:
            out.missing += 1
        else:
            out.values.append(v)
    return out


def latency_rows(tag: str, jobs: list[Job], events: Events, data_dir: Path,
                 sequential: bool) -> list[Series]:
    def since_exit(job: Job) -> float | None:
        done, exited = events.at(job.id, "complete"), ended_at(data_dir, job)
        return done - exited if done is not None and exited is not None else None

    def process_start(job: Job) -> float | None:
        started = started_at(data_dir, job)
        return started - job.sent if started is not None else None

    def after_process(job: Job) -> float | None:
        running, started = events.at(job.id, "running"), started_at(data_dir, job)
        return running - started if running is not None and started is not None else None

    def start_running(job: Job) -> float | None:
        running = events.at(job.id, "running")
        return running - job.sent if running is not None else None

    if sequential:
        running = series(f"start -> running ({tag})", jobs, start_running,
                         TARGET_START_RUNNING_P50)
    else:
        running = series(f"start -> running ({tag})", jobs, start_running,
                         TARGET_MANY_RUNNING_P50, TARGET_MANY_RUNNING_P99)
    return [
        running,
        series("  PUT start round trip", jobs, lambda j: j.answered - j.sent),
        series("  PUT sent -> process up (started.json)", jobs, process_start),
        series("  process up -> running event", jobs, after_process),
        series(f"exit -> complete ({tag})", jobs, since_exit,
               TARGET_EXIT_COMPLETE_P50 if sequential else None),
    ]


def print_table(rows: list[Series]) -> None:
    print(f"\n{'seconds':<40} {'n':>4} {'p50':>7} {'p99':>7} {'max':>7}  target")
    parent = ""
    for row in rows:
        # An indented row splits the row above it: its figures are named after both.
        name = f"{parent}: {row.label.strip()}" if row.label.startswith(" ") else row.label
        parent = parent if row.label.startswith(" ") else row.label
        if not row.values:
            print(f"{row.label:<40} {0:>4}  (no data; {row.missing} missing)")
            continue
        p50, p99 = row.pct(50), row.pct(99)
        target = ""
        if row.target is not None:
            met = p50 <= row.target
            target = f"p50 <= {row.target:g}"
            if row.target_p99 is not None:
                met = met and p99 <= row.target_p99
                target += f", p99 <= {row.target_p99:g}"
            target += f"  {'met' if met else 'MISSED'}"
        missing = f"  ({row.missing} missing)" if row.missing else ""
        print(f"{row.label:<40} {len(row.values):>4} {p50:7.3f} {p99:7.3f} "
              f"{max(row.values):7.3f}  {target}{missing}")
        harness.emit("jobs_latency", f"{name} p50", p50, "s")
        harness.emit("jobs_latency", f"{name} p99", p99, "s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process itself, not of its children."""
    if psutil is not None:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (it is shared: context only)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# --- the two phases -------------------------------------------------------------------

async def sequential_phase(client: httpx.AsyncClient, st: Stack, events: Events,
                           args: argparse.Namespace) -> tuple[list[Job], list[int]]:
    """Jobs one after another; the jobs and those that did not complete on the socket."""
    user = st.users[0]
    jobs = []
    for n in range(args.jobs):
        workspace = user.workspaces[n % len(user.workspaces)]
        jobs.append(await start_job(client, user, workspace, args.duration,
                                    time_limit_for(args.duration)))
        await asyncio.sleep(args.gap)
    ids = [j.id for j in jobs]
    await events.wait_all(ids, TERMINAL, timeout=args.duration + 60)
    return jobs, [i for i in ids if events.at(i, "complete") is None]


async def start_many(client: httpx.AsyncClient, st: Stack, args: argparse.Namespace
                     ) -> tuple[list[Job], list[StartFailure], float]:
    """``--concurrent`` starts, ``START_CONCURRENCY`` in flight; jobs, failures, seconds."""
    gate = asyncio.Semaphore(START_CONCURRENCY)
    slots = [(u, w) for u in st.users for w in u.workspaces]
    limit = time_limit_for(args.hold)

    async def one(n: int) -> Job | StartFailure:
        user, workspace = slots[n % len(slots)]
        async with gate:
            try:
                return await start_job(client, user, workspace, args.hold, limit)
            except Exception as exc:
                return StartFailure(workspace, str(exc))

    began = time.monotonic()
    results = await asyncio.gather(*(one(n) for n in range(args.concurrent)))
    elapsed = time.monotonic() - began
    jobs = [r for r in results if isinstance(r, Job)]
    return jobs, [r for r in results if isinstance(r, StartFailure)], elapsed


@dataclass
class CpuReport:
    seconds: float
    cores: dict[str, float]
    shortened: bool = False


class CpuMeter:
    """Average cores used by our processes (and the whole machine) since ``__init__``."""

    def __init__(self, st: Stack) -> None:
        self.pids = st.pids()
        self.before = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.busy_before, self.t0 = machine_busy_seconds(), time.monotonic()

    def read(self) -> CpuReport:
        elapsed = time.monotonic() - self.t0
        cores = {k: (cpu_seconds(p) - self.before[k]) / elapsed for k, p in self.pids.items()}
        cores["machine"] = (machine_busy_seconds() - self.busy_before) / elapsed
        return CpuReport(elapsed, cores)


async def sample_cpu(st: Stack, jobs: list[Job], args: argparse.Namespace) -> CpuReport:
    """The steady state: a window ended early enough that no job exits in it."""
    started = [t for t in (started_at(st.data_dir, j) for j in jobs) if t is not None]
    first_exit = min(started) + args.hold if started else math.inf
    seconds = max(0.0, min(args.window, first_exit - 1.0 - time.time()))
    meter = CpuMeter(st)
    await asyncio.sleep(seconds)
    report = meter.read()
    report.shortened = seconds < args.window
    return report


async def sample_idle(st: Stack) -> CpuReport:
    """The cost of the stack with no job active, to set the steady state against."""
    meter = CpuMeter(st)
    await asyncio.sleep(IDLE_WINDOW_S)
    return meter.read()


async def concurrent_phase(client: httpx.AsyncClient, st: Stack, events: Events,
                           args: argparse.Namespace) -> dict[str, Any]:
    ramp_meter = CpuMeter(st)
    jobs, failures, start_seconds = await start_many(client, st, args)
    print(f"  {len(jobs)} started in {start_seconds:.1f}s, {len(failures)} refused",
          flush=True)
    ids = [j.id for j in jobs]
    ramp_began = time.monotonic()
    # Stop waiting if some job already ended: then "all running at once" cannot happen.
    all_running = await events.wait_all(
        ids, ("running", *TERMINAL), timeout=args.hold,
        also=lambda: events.count(ids, TERMINAL) > 0)
    ramp_cpu = ramp_meter.read()
    running = events.count(ids, ("running",))
    ramp = time.monotonic() - ramp_began
    print(f"  {running}/{len(jobs)} running {ramp:.1f}s after the last start answered; "
          "sampling CPU", flush=True)
    cpu = await sample_cpu(st, jobs, args)
    print(f"  sampled {cpu.seconds:.1f}s; waiting for the jobs to end", flush=True)
    await events.wait_all(ids, TERMINAL, timeout=args.hold + 120)
    return {"jobs": jobs, "failures": failures, "start_seconds": start_seconds,
            "all_running": all_running, "running": running, "ramp": ramp, "cpu": cpu,
            "ramp_cpu": ramp_cpu,
            "not_complete": [i for i in ids if events.at(i, "complete") is None]}


# --- report ---------------------------------------------------------------------------

def print_cpu(rows: list[tuple[str, CpuReport]], hold_hint: float) -> None:
    """Cores used on average; the target concerns the steady-state row (the last)."""
    print(f"\n{'CPU, average cores':<40} {'secs':>5} {'worker':>7} {'temporal':>8} "
          f"{'both':>6} {'api':>6} {'machine':>8}")
    for n, (label, cpu) in enumerate(rows):
        c = cpu.cores
        both = c["worker"] + c["temporal"]
        verdict = ""
        if n == len(rows) - 1:
            verdict = f"  target both < {TARGET_CORES:g}  " + \
                ("met" if both < TARGET_CORES else "MISSED")
        print(f"{label:<40} {cpu.seconds:5.1f} {c['worker']:7.3f} {c['temporal']:8.3f} "
              f"{both:6.3f} {c['api']:6.3f} {c['machine']:8.3f}{verdict}")
        harness.emit("jobs_latency", f"cores worker+temporal ({label})", both, "cores")
    if rows[-1][1].shortened:
        print("(steady-state window shortened: the first jobs were about to exit; "
              f"rerun with --hold above {hold_hint:.0f} for the whole window)")
    print("(worker and temporal: those processes alone, not their children; machine: all "
          "busy cores of this shared machine)")


def print_starts(result: dict[str, Any], requested: int) -> None:
    jobs, seconds = result["jobs"], result["start_seconds"]
    round_trips = Series("", [j.answered - j.sent for j in jobs])
    harness.emit("jobs_latency", "start endpoint", requested / seconds, "req/s")
    print(f"\nstart endpoint: {requested} requests ({START_CONCURRENCY} in flight) in "
          f"{seconds:.2f}s = {requested / seconds:.1f} req/s; {len(jobs)} accepted, "
          f"{len(result['failures'])} refused", end="")
    if round_trips.values:
        print(f"; round trip p50 {round_trips.pct(50):.3f}s p99 {round_trips.pct(99):.3f}s")
    else:
        print()
    for failure in result["failures"][:5]:
        print(f"  refused in workspace {failure.workspace_id}: {failure.error}")


def print_outcome(label: str, jobs: list[Job], not_on_socket: list[int],
                  not_listed: dict[int, str]) -> None:
    print(f"{label}: {len(jobs) - len(not_on_socket)}/{len(jobs)} complete on the socket, "
          f"{len(jobs) - len(not_listed)}/{len(jobs)} in GET /jobs/?status=complete")
    if not_on_socket:
        print(f"  no complete event for: {sorted(not_on_socket)[:20]}")
    for job_id, status in sorted(not_listed.items())[:20]:
        print(f"  job {job_id}: {status}")


# --- main -----------------------------------------------------------------------------

async def measure(st: Stack, args: argparse.Namespace) -> int:
    events = Events()
    conc: dict[str, Any] | None = None
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{st.api_port}", timeout=60) as client, \
            sockets(st.api_port, st.users, events):
        print(f"\n1. {args.jobs} jobs of {args.duration:g}s, one every {args.gap:g}s "
              "after the previous start answered", flush=True)
        seq_jobs, seq_missing = await sequential_phase(client, st, events, args)
        seq_not_listed = await final_check(client, seq_jobs)
        if seq_missing or seq_not_listed:
            # A stack that cannot finish 40 jobs one by one would only waste minutes here.
            print("  not every job completed: phase 2 skipped", flush=True)
        else:
            idle_cpu = await sample_idle(st)
            print(f"\n2. {args.concurrent} jobs of {args.hold:g}s across {USERS} users x "
                  f"{WORKSPACES_PER_USER} workspaces", flush=True)
            conc = await concurrent_phase(client, st, events, args)
            conc["not_listed"] = await final_check(client, conc["jobs"])

    rows = latency_rows("sequential", seq_jobs, events, st.data_dir, sequential=True)
    if conc is not None:
        rows += latency_rows(f"{args.concurrent} at once", conc["jobs"], events, st.data_dir,
                             sequential=False)
    print_table(rows)
    if conc is not None:
        print_starts(conc, args.concurrent)
        print(f"all {args.concurrent} running: {'yes' if conc['all_running'] else 'NO'} "
              f"(at most {conc['running']} seen; {conc['ramp']:.1f}s after the starts)")
        print_cpu([("idle: no job active", idle_cpu),
                   ("starts until all ran", conc["ramp_cpu"]),
                   (f"steady: {conc['running']} jobs running", conc["cpu"])],
                  hold_hint=conc["ramp_cpu"].seconds + args.window + 5)
    print()
    print_outcome("sequential", seq_jobs, seq_missing, seq_not_listed)
    failed = len(seq_missing) + len(seq_not_listed)
    if conc is not None:
        print_outcome("concurrent", conc["jobs"], conc["not_complete"], conc["not_listed"])
        failed += len(conc["not_complete"]) + len(conc["not_listed"]) + len(conc["failures"])
    harness.emit("jobs_latency", "jobs not completed", failed, "count")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 1 if failed or conc is None else 0


def run(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> int:
    began = time.monotonic()
    st = start_stack(tmp, stack)
    print(f"stack up in {time.monotonic() - began:.1f}s (psutil: "
          f"{'yes' if psutil is not None else 'no, /proc'})", flush=True)
    status = asyncio.run(measure(st, args))
    if status:
        harness.print_log_tails(st.logs)  # why jobs did not complete is in there
    return status


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40, help="sequential jobs (latency)")
    parser.add_argument("--duration", type=float, default=2.0,
                        help="seconds each sequential job sleeps")
    parser.add_argument("--gap", type=float, default=0.5,
                        help="seconds between one start's answer and the next start")
    parser.add_argument("--concurrent", type=int, default=200, help="jobs running at once")
    parser.add_argument("--hold", type=float, default=60.0,
                        help="seconds each concurrent job sleeps")
    parser.add_argument("--window", type=float, default=30.0, help="CPU sampling seconds")
    return harness.checked_args(parser, at_least_one=("--jobs", "--concurrent"))


if __name__ == "__main__":
    sys.exit(harness.run_bench(run, parse_args))
