"""Many users at once: errors, lost status events and latency per endpoint.

Starts its own PostgreSQL database, Temporal dev server, worker and API
(``bench.harness.start_stack``, on the local test job's config). Then ``--users`` simulated users
(asyncio + httpx + websockets), each with its own ``/jobs/`` WebSocket, for ``--duration``
seconds create workspaces, upload files, start LocalTestJobs of 1-3 s, stop some of them,
read their jobs and workspaces, and delete idle workspaces, with a short think time
between steps. Afterwards every job must end, its final status must have arrived on its
owner's socket and match ``GET /jobs/{id}/``.

Prints p50/p99 latency per endpoint (method and route template), the errors (any answer
the contract does not give for that step, any exception) and the lost events; exits
non-zero on any error or lost event.

    .venv/bin/python bench/load.py [--users 50] [--duration 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect as ws_connect

try:  # `python bench/x.py`: bench/, not the repository, is on sys.path; harness adds it
    import harness
except ModuleNotFoundError:  # `python -m bench.x`
    from bench import harness
from app.stack import HOST

TERMINAL = ("complete", "failed")
MAX_WORKSPACES = 3  # per user; past it an idle one is deleted
MAX_ACTIVE_JOBS = 2  # per user
THINK_S = (0.3, 1.5)
SETTLE_S = 120.0  # how long jobs may take to end after the load stops
# Answers that are right for a step that raced a job's own end (not errors).
RACES = {"This job is not running or pending.",
         "Cannot delete workspace, jobs are running for this workspace."}


@dataclass
class Stats:
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    races: int = 0


@dataclass
class Sim:
    """One simulated user: their workspaces, jobs and what their socket said."""

    name: str
    token: str
    workspaces: list[int] = field(default_factory=list)
    jobs: dict[int, int] = field(default_factory=dict)  # job id -> workspace id
    socket_status: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    socket_error: str | None = None
    rng: random.Random = field(default_factory=random.Random)

    @property
    def auth(self) -> dict[str, str]:
        return {"UWS-Authorization": f"Token {self.token}"}

    def active_jobs(self) -> list[int]:
        return [j for j in self.jobs if not self.final(j)]

    def final(self, job_id: int) -> str | None:
        seen = [s for s in self.socket_status.get(job_id, []) if s in TERMINAL]
        return seen[-1] if seen else None


async def call(client: httpx.AsyncClient, stats: Stats, sim: Sim, method: str,
               template: str, path: str, **kwargs: Any) -> httpx.Response | None:
    """One request, timed under ``method template``; an unexpected answer is an error."""
    label = f"{method} {template}"
    began = time.perf_counter()
    try:
        response = await client.request(method, path, headers=sim.auth, **kwargs)
    except httpx.HTTPError as exc:
        stats.errors.append(f"{label} ({sim.name}): {type(exc).__name__}: {exc}")
        return None
    stats.latency[label].append((time.perf_counter() - began) * 1000)
    if response.status_code == 200:
        return response
    message = _message(response)
    if response.status_code == 400 and message in RACES:
        stats.races += 1
        return None
    stats.errors.append(f"{label} ({sim.name}): {response.status_code} {response.text[:200]}")
    return None


def _message(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        return response.json().get("message")
    return None


async def listen(sim: Sim, port: int, ready: asyncio.Event) -> None:
    try:
        async with ws_connect(f"ws://{HOST}:{port}/jobs/?token={sim.token}",
                              max_size=None) as socket:
            ready.set()
            async for raw in socket:
                event = json.loads(raw)
                sim.socket_status[event["id"]].append(event["status"])
    except Exception as exc:  # any end of a socket we did not close is lost events
        sim.socket_error = f"{type(exc).__name__}: {exc}"
        ready.set()


async def create_workspace(client: httpx.AsyncClient, stats: Stats, sim: Sim) -> None:
    n = secrets.token_hex(3)
    response = await call(client, stats, sim, "POST", "/workspaces/", "/workspaces/", json={
        "name": f"load-{n}", "description": "load test", "default_job_type": harness.JOB_TYPE,
        "workspace_details": {"files": [{"name": "notes/readme.txt", "content": "hello"}]}})
    if response is not None:
        sim.workspaces.append(response.json()["data"]["workspace"]["id"])


async def delete_workspace(client: httpx.AsyncClient, stats: Stats, sim: Sim) -> None:
    busy = set(sim.jobs[j] for j in sim.active_jobs())
    idle = [w for w in sim.workspaces if w not in busy]
    if not idle:
        return
    wid = sim.rng.choice(idle)
    response = await call(client, stats, sim, "DELETE", "/workspaces/{id}/",
                          f"/workspaces/{wid}/")
    if response is not None:
        sim.workspaces.remove(wid)


async def upload(client: httpx.AsyncClient, stats: Stats, sim: Sim) -> None:
    wid = sim.rng.choice(sim.workspaces)
    data = os.urandom(sim.rng.randint(1, 64) * 1024)
    await call(client, stats, sim, "PUT", "/workspaces/{id}/upload/",
               f"/workspaces/{wid}/upload/",
               files={"file": (f"data-{secrets.token_hex(3)}.bin", data)})


async def start_job(client: httpx.AsyncClient, stats: Stats, sim: Sim) -> None:
    wid = sim.rng.choice(sim.workspaces)
    response = await call(client, stats, sim, "PUT", "/workspaces/{id}/start/",
                          f"/workspaces/{wid}/start/", json={
                              "job_type": harness.JOB_TYPE,
                              "job_details": {"duration_seconds": sim.rng.uniform(1, 3)},
                              "resource_options": {"time_limit_min": 5}})
    if response is not None:
        sim.jobs[response.json()["data"]["job"]["id"]] = wid


async def stop_job(client: httpx.AsyncClient, stats: Stats, sim: Sim) -> None:
    active = sim.active_jobs()
    if active:
        job = sim.rng.choice(active)
        await call(client, stats, sim, "PUT", "/jobs/{id}/stop/", f"/jobs/{job}/stop/")


async def read_something(client: httpx.AsyncClient, stats: Stats, sim: Sim) -> None:
    choice = sim.rng.random()
    if choice < 0.3 and sim.jobs:
        job = sim.rng.choice(list(sim.jobs))
        await call(client, stats, sim, "GET", "/jobs/{id}/", f"/jobs/{job}/")
    elif choice < 0.5:
        await call(client, stats, sim, "GET", "/jobs/", "/jobs/")
    elif choice < 0.8 and sim.workspaces:
        wid = sim.rng.choice(sim.workspaces)
        await call(client, stats, sim, "GET", "/workspaces/{id}/", f"/workspaces/{wid}/")
    else:
        await call(client, stats, sim, "GET", "/workspaces/", "/workspaces/")


async def step(client: httpx.AsyncClient, stats: Stats, sim: Sim) -> None:
    """One action, chosen by what the user has."""
    if not sim.workspaces:
        await create_workspace(client, stats, sim)
        return
    roll = sim.rng.random()
    if roll < 0.10:
        if len(sim.workspaces) >= MAX_WORKSPACES:
            await delete_workspace(client, stats, sim)
        else:
            await create_workspace(client, stats, sim)
    elif roll < 0.25:
        await upload(client, stats, sim)
    elif roll < 0.45 and len(sim.active_jobs()) < MAX_ACTIVE_JOBS:
        await start_job(client, stats, sim)
    elif roll < 0.55:
        await stop_job(client, stats, sim)
    else:
        await read_something(client, stats, sim)


async def user_loop(client: httpx.AsyncClient, stats: Stats, sim: Sim, deadline: float) -> None:
    await asyncio.sleep(sim.rng.uniform(0, THINK_S[1]))  # spread the first steps
    while time.monotonic() < deadline:
        try:
            await step(client, stats, sim)
        except Exception as exc:
            stats.errors.append(f"step ({sim.name}): {type(exc).__name__}: {exc}")
        await asyncio.sleep(sim.rng.uniform(*THINK_S))


async def settle(client: httpx.AsyncClient, sims: list[Sim]) -> list[str]:
    """Wait for every job's final event; then compare each with ``GET /jobs/{id}/``."""
    for _ in range(int(SETTLE_S / 0.5)):  # the sockets' readers fill in the statuses
        if not any(s.active_jobs() for s in sims):
            break
        await asyncio.sleep(0.5)
    lost = []
    for sim in sims:
        if sim.socket_error:
            lost.append(f"{sim.name}: socket ended: {sim.socket_error}")
        for job_id in sim.jobs:
            response = await client.get(f"/jobs/{job_id}/", headers=sim.auth)
            listed = response.json()["data"]["jobs"] if response.status_code == 200 else []
            server = listed[0]["status"] if listed else f"HTTP {response.status_code}"
            seen = sim.final(job_id)
            if seen is None or seen != server:
                lost.append(f"job {job_id} ({sim.name}): socket saw "
                            f"{sim.socket_status.get(job_id, [])}, GET says {server}")
    return lost


def report(stats: Stats, sims: list[Sim], lost: list[str], seconds: float) -> None:
    total = sum(len(v) for v in stats.latency.values())
    print(f"\n{'endpoint':<32} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for label in sorted(stats.latency):
        values = stats.latency[label]
        p50, p99 = harness.percentile(values, 50), harness.percentile(values, 99)
        print(f"{label:<32} {len(values):6d} {p50:8.1f} {p99:8.1f}")
        harness.emit("load", f"{label} p50", round(p50, 2), "ms")
        harness.emit("load", f"{label} p99", round(p99, 2), "ms")
    jobs = sum(len(s.jobs) for s in sims)
    print(f"\n{total} requests in {seconds:.0f}s ({total / seconds:.1f} req/s) by {len(sims)} "
          f"users; {jobs} jobs; {stats.races} answers that raced a job's end (not errors)")
    print(f"errors: {len(stats.errors)}")
    for line in stats.errors[:30]:
        print(f"  {line}")
    print(f"lost status events: {len(lost)} of {jobs} jobs")
    for line in lost[:30]:
        print(f"  {line}")
    harness.emit("load", "requests per second", round(total / seconds, 1), "req/s")
    harness.emit("load", "jobs", jobs, "count")
    harness.emit("load", "errors", len(stats.errors), "count")
    harness.emit("load", "lost status events", len(lost), "count")


async def drive(port: int, tokens: list[str], args: argparse.Namespace) -> int:
    sims = [Sim(f"user{n}", token, rng=random.Random(args.seed + n))
            for n, token in enumerate(tokens)]
    stats = Stats()
    limits = httpx.Limits(max_connections=len(sims) * 2, max_keepalive_connections=len(sims))
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=60,
                                 limits=limits) as client:
        readies = [asyncio.Event() for _ in sims]
        listeners = [asyncio.create_task(listen(s, port, r)) for s, r in zip(sims, readies,
                                                                               strict=True)]
        await asyncio.gather(*(r.wait() for r in readies))
        await asyncio.sleep(1.0)  # a socket subscribes after its token lookup
        began = time.monotonic()
        deadline = began + args.duration
        await asyncio.gather(*(user_loop(client, stats, s, deadline) for s in sims))
        seconds = time.monotonic() - began
        print(f"load stopped after {seconds:.0f}s; waiting for the jobs to end", flush=True)
        lost = await settle(client, sims)
        for task in listeners:
            task.cancel()
    report(stats, sims, lost, seconds)
    return 1 if stats.errors or lost else 0


def run(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> int:
    st = harness.start_stack(stack, tmp, config=harness.local_test_config(tmp / "config.toml"),
                             users=args.users)
    print(f"stack up; {args.users} users for {args.duration:g}s", flush=True)
    status = asyncio.run(drive(st.api_port, [user.token for user in st.users], args))
    if status:
        harness.print_log_tails(st.logs)
    return status


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50, help="simulated users")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--seed", type=int, default=7, help="seed of the users' choices")
    return harness.checked_args(parser, at_least_one=("--users",), positive=("--duration",))


if __name__ == "__main__":
    sys.exit(harness.run_bench(run, parse_args))
