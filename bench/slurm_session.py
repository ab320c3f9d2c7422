"""Start → "session ready" of a JupyterLab session: on Slurm against the local resource.

Starts one PostgreSQL database and one Temporal dev server (``bench.harness``), a
single-node Slurm cluster (``app/slurm_dev.py``, free ports, a temporary state dir), and
two ``uws worker`` + ``uws api`` pairs on task queues of their own: one wired by
``config.toml`` (the local resource: a supervised process in its own network namespace),
one by ``tests/data/slurm-config.toml`` (slurmrestd, JupyterLab in a batch job). Each
side has its own user (a real OS account) and workspace. Then, alternating A B A B,
``--sessions`` of each after one unmeasured warm-up of each:
``PUT /workspaces/{id}/start/`` of ``jupyter_lab``, ``GET /jobs/{id}/`` every 50 ms until
the job is ``running`` and then until its ``current_job_details.message`` is
"Webserver ready." (the server's own readiness probe answered), then a stop, waited for.
Prints p50/max of start → running and start → ready of both, and the ratios slurm/local;
with ``UWS_BENCH_JSON`` set, appends them as JSON lines. Needs root and the Slurm packages
(``uws slurm-dev install``).

    .venv/bin/python bench/slurm_session.py [--sessions 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

try:  # `python bench/x.py`: bench/, not the repository, is on sys.path; harness adds it
    import harness
except ModuleNotFoundError:  # `python -m bench.x`
    from bench import harness
from app import slurm_dev

BENCH = "slurm_session"
POLL_S = 0.05
READY = "Webserver ready."
LOCAL_CONFIG = harness.REPO / "config.toml"


def write_configs(tmp: Path, cluster: slurm_dev.DevCluster) -> dict[str, Path]:
    paths = {"local": tmp / "local.toml", "slurm": tmp / "slurm.toml"}
    paths["local"].write_text(LOCAL_CONFIG.read_text())
    harness.write_toml(paths["slurm"], harness.slurm_config(cluster))
    return paths


@dataclass
class Side:
    """One resource's stack, as a client sees it."""

    label: str
    api: httpx.AsyncClient
    workspace_id: int

    async def session(self) -> tuple[float, float]:
        """(start → running, start → ready) of one session, which is then stopped."""
        sent = time.monotonic()
        r = await self.api.put(f"/workspaces/{self.workspace_id}/start/",
                               json={"job_type": "jupyter_lab"})
        r.raise_for_status()
        job_id = r.json()["data"]["job"]["id"]
        running = None
        while True:
            job = (await self.api.get(f"/jobs/{job_id}/")).json()["data"]["jobs"][0]
            if job["status"] == "running" and running is None:
                running = time.monotonic() - sent
            details = job["job_details"].get("current_job_details", {})
            if details.get("message") == READY and job["status"] == "running":
                ready = time.monotonic() - sent
                break
            if job["status"] not in ("pending", "running"):
                raise RuntimeError(f"{self.label} session {job_id} ended unready: {job}")
            await asyncio.sleep(POLL_S)
        (await self.api.put(f"/jobs/{job_id}/stop/")).raise_for_status()
        while job["status"] not in ("complete", "failed"):
            await asyncio.sleep(0.2)
            job = (await self.api.get(f"/jobs/{job_id}/")).json()["data"]["jobs"][0]
        return running or ready, ready


async def measure(sides: list[Side], sessions: int) -> int:
    for side in sides:  # the first session of each pays for cold caches and a cold queue
        await side.session()
    results: dict[str, list[tuple[float, float]]] = {side.label: [] for side in sides}
    for i in range(sessions):
        for side in sides:
            results[side.label].append(await side.session())
            running, ready = results[side.label][-1]
            print(f"  {i + 1:3d} {side.label:6s} running {running:6.3f} s  ready {ready:6.3f} s",
                  flush=True)
    print()
    print(f"{'start ->':16s} {'running p50':>12s} {'max':>8s} {'ready p50':>10s} {'max':>8s}")
    p50 = {}
    for label, values in results.items():
        running = [v[0] for v in values]
        ready = [v[1] for v in values]
        p50[label] = (harness.percentile(running, 50), harness.percentile(ready, 50))
        print(f"{label:16s} {p50[label][0]:11.3f}s {max(running):7.3f}s "
              f"{p50[label][1]:9.3f}s {max(ready):7.3f}s")
        harness.emit(BENCH, f"{label}_start_to_running_p50", p50[label][0], "s")
        harness.emit(BENCH, f"{label}_start_to_ready_p50", p50[label][1], "s")
    for index, what in ((0, "running"), (1, "ready")):
        ratio = p50["slurm"][index] / p50["local"][index]
        print(f"ratio slurm/local, start -> {what} p50: {ratio:.2f}")
        harness.emit(BENCH, f"ratio_{what}_p50", ratio, "ratio")
    for side in sides:
        await side.api.aclose()
    return 0


def start_side(label: str, config: Path, tmp: Path, stack: contextlib.ExitStack,
               beside: harness.BenchStack | None = None) -> tuple[Side, harness.BenchStack]:
    """A worker and ``uws api`` on ``config`` (with ``beside``'s database and Temporal
    dev server when given), a user (a real OS account) and a workspace."""
    st = harness.start_stack(stack, tmp, config=config, serve_api=False, beside=beside,
                             logs=tmp / "logs" / label)
    # POST /tokens/ creates the OS account that runs the sessions (create_external_users).
    user = st.new_user(workspaces=1)
    client = httpx.AsyncClient(base_url=st.api_url, timeout=30, headers=user.auth)
    return Side(label, client, user.workspaces[0]), st


def run(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> int:
    began = time.monotonic()
    cluster = harness.slurm_cluster(stack)
    configs = write_configs(tmp, cluster)
    local, first = start_side("local", configs["local"], tmp, stack)
    slurm, _ = start_side("slurm", configs["slurm"], tmp, stack, beside=first)
    print(f"stacks up in {time.monotonic() - began:.1f}s", flush=True)
    return asyncio.run(measure([local, slurm], args.sessions))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=5, help="sessions of each kind")
    return harness.checked_args(parser, at_least_one=("--sessions",))


if __name__ == "__main__":
    sys.exit(harness.run_bench(run, parse_args, slurm=True))
