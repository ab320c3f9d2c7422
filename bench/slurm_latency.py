"""Submit → ``running`` latency on Slurm: through our API against ``sbatch`` directly.

Starts a single-node Slurm cluster (``app/slurm_dev.py``, free ports, a temporary state
dir) and its own PostgreSQL database, Temporal dev server, worker and API
(``bench.harness``), wired by ``tests/data/slurm-config.toml`` with the resource's
default poll interval unless ``--poll`` says otherwise. Then, alternating A B A B, ``--jobs``
of each:

- ours: ``PUT /workspaces/{id}/start/`` of a ``batch_script`` job, then ``GET /jobs/{id}/``
  every 50 ms until it says ``running``;
- direct: ``sbatch --parsable`` as the same OS user, then slurmrestd's ``GET /job/{id}``
  every 50 ms until ``RUNNING``.

Each job sleeps ``--sleep`` s and is waited for before the next starts, so the cluster is
idle at every submission. One unmeasured job of each kind warms the cluster up first.
Prints p50/p99 of both and the ratios ours/direct; with ``UWS_BENCH_JSON`` set, appends
them as JSON lines. Needs root and the Slurm packages (``uws slurm-dev install``).

    .venv/bin/python bench/slurm_latency.py [--jobs 20] [--sleep 2] [--poll 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

try:  # `python bench/x.py`: bench/, not the repository, is on sys.path; harness adds it
    import harness
except ModuleNotFoundError:  # `python -m bench.x`
    from bench import harness
from app import slurm_dev
from app.stack import HOST

BENCH = "slurm_latency"
POLL_S = 0.05


def write_config(path: Path, cluster: slurm_dev.DevCluster, poll: float | None) -> Path:
    config = harness.slurm_config(cluster)
    resource = config["available_resources"]["slurm_resource"]["connection_details"]
    resource.pop("poll_interval_seconds", None)
    if poll is not None:
        resource["poll_interval_seconds"] = poll
    return harness.write_toml(path, config)


class Bench:
    def __init__(self, cluster: slurm_dev.DevCluster, api_port: int, token: str,
                 workspace_id: int, username: str, sleep: float) -> None:
        self.cluster, self.sleep, self.username = cluster, sleep, username
        self.workspace_id = workspace_id
        self.api = httpx.AsyncClient(base_url=f"http://{HOST}:{api_port}", timeout=30,
                                     headers={"UWS-Authorization": f"Token {token}"})
        self.rest = httpx.AsyncClient(
            base_url=f"{cluster.rest_url}/slurm/{slurm_dev.API_VERSION}", timeout=30,
            headers={"X-SLURM-USER-NAME": "root",
                     "X-SLURM-USER-TOKEN": slurm_dev.token(cluster, "root", 4 * 3600)})
        self.workdir = Path(os.path.expanduser(f"~{username}"))

    async def ours(self, warm_up: bool = False) -> float:
        body = {"job_type": "batch_script",
                "job_details": {"script": f"#!/bin/sh\nsleep {self.sleep}\n"}}
        sent = time.monotonic()
        r = await self.api.put(f"/workspaces/{self.workspace_id}/start/", json=body)
        r.raise_for_status()
        job_id = r.json()["data"]["job"]["id"]
        while True:
            job = (await self.api.get(f"/jobs/{job_id}/")).json()["data"]["jobs"][0]
            if job["status"] == "running":
                latency = time.monotonic() - sent
                break
            if job["status"] in ("complete", "failed"):
                # The first job after a cold start spends most of its life CONFIGURING
                # (pending to us): a short one may end before it is seen running.
                if warm_up:
                    return math.nan
                raise RuntimeError(f"job {job_id} ended before we saw it run: {job}")
            await asyncio.sleep(POLL_S)
        while job["status"] not in ("complete", "failed"):
            await asyncio.sleep(0.2)
            job = (await self.api.get(f"/jobs/{job_id}/")).json()["data"]["jobs"][0]
        return latency

    async def direct(self) -> float:
        cmd = ["runuser", "-u", self.username, "--", "sbatch", "--parsable",
               "-D", str(self.workdir), "-o", "/dev/null", "--wrap", f"sleep {self.sleep}"]
        sent = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=self.cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {err.decode()}")
        slurm_id = int(out.decode().split(";")[0])
        while True:
            state = await self._state(slurm_id)
            if state == "RUNNING":
                latency = time.monotonic() - sent
                break
            if state not in ("PENDING", "CONFIGURING"):
                raise RuntimeError(f"Slurm job {slurm_id} went {state} before RUNNING")
            await asyncio.sleep(POLL_S)
        while state in ("PENDING", "RUNNING", "COMPLETING"):
            await asyncio.sleep(0.2)
            state = await self._state(slurm_id)
        return latency

    async def _state(self, slurm_id: int) -> str:
        r = await self.rest.get(f"/job/{slurm_id}")
        return r.json()["jobs"][0]["job_state"]


async def measure(bench: Bench, jobs: int) -> int:
    await bench.ours(warm_up=True)  # the first job after a cold start is slow on both paths
    await bench.direct()
    ours: list[float] = []
    direct: list[float] = []
    for i in range(jobs):
        for label, run, into in (("ours", bench.ours, ours), ("direct", bench.direct, direct)):
            into.append(await run())
            print(f"  {i + 1:3d} {label:6s} {into[-1]:.3f} s", flush=True)
    print()
    print(f"{'submit -> running':24s} {'p50':>8s} {'p99':>8s} {'max':>8s}")
    for label, values in (("ours (API, batch_script)", ours), ("direct (sbatch)", direct)):
        p50, p99 = harness.percentile(values, 50), harness.percentile(values, 99)
        print(f"{label:24s} {p50:7.3f}s {p99:7.3f}s {max(values):7.3f}s")
        key = label.split()[0]
        harness.emit(BENCH, f"{key}_submit_to_running_p50", p50, "s")
        harness.emit(BENCH, f"{key}_submit_to_running_p99", p99, "s")
    for pct in (50, 99):
        ratio = harness.percentile(ours, pct) / harness.percentile(direct, pct)
        print(f"ratio ours/direct p{pct}: {ratio:.2f}")
        harness.emit(BENCH, f"ratio_p{pct}", ratio, "ratio")
    await bench.api.aclose()
    await bench.rest.aclose()
    return 0


def run(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> int:
    began = time.monotonic()
    cluster = harness.slurm_cluster(stack)
    config = write_config(tmp / "config.toml", cluster, args.poll)
    st = harness.start_stack(stack, tmp, config=config)
    # POST /tokens/ creates the OS account that runs the jobs (create_external_users).
    user = st.new_user(workspaces=1)
    print(f"stack up in {time.monotonic() - began:.1f}s; user {user.name}; "
          f"resource poll interval {args.poll if args.poll is not None else 'default'}",
          flush=True)
    bench = Bench(cluster, st.api_port, user.token, user.workspaces[0], user.name, args.sleep)
    return asyncio.run(measure(bench, args.jobs))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs of each kind")
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds each job sleeps")
    parser.add_argument("--poll", type=float, default=None,
                        help="the resource's poll_interval_seconds (default: its default)")
    return harness.checked_args(parser, at_least_one=("--jobs",))


if __name__ == "__main__":
    sys.exit(harness.run_bench(run, parse_args, slurm=True))
