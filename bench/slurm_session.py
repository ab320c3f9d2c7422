"""Start → "session ready" of a JupyterLab session: on Slurm against the local resource.

Starts one PostgreSQL database and one Temporal dev server (the helpers of
``bench.api_throughput``), a single-node Slurm cluster (``core/slurm_dev.py``, free ports,
a temporary state dir), and two ``uws worker`` + ``uws api`` pairs on task queues of their
own: one wired by ``config.toml`` (the local resource: a supervised process in its own
network namespace), one by ``tests/data/slurm-config.toml`` (slurmrestd, JupyterLab in a
batch job). Each side has its own user (a real OS account) and workspace. Then, alternating
A B A B, ``--sessions`` of each after one unmeasured warm-up of each:
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
import os
import secrets
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # `python bench/slurm_session.py` puts bench/, not the repository, on the path.
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import tomli_w  # noqa: E402

from app import slurm_dev  # noqa: E402
from app.devstack import start_temporal_dev_server, stop_process, wait_for_port  # noqa: E402
from bench.api_throughput import (  # noqa: E402
    HOST,
    _prepare_database,
    _print_log_tails,
    call_json,
    create_workspace,
    database,
    free_port,
    print_machine,
    run_with_cleanup,
    start_child,
)
from bench.report import emit, percentile  # noqa: E402

BENCH = "slurm_session"
POLL_S = 0.05
READY = "Webserver ready."
LOCAL_CONFIG = REPO / "config.toml"
SLURM_CONFIG = REPO / "tests" / "data" / "slurm-config.toml"


def write_configs(tmp: Path, cluster: slurm_dev.DevCluster) -> dict[str, Path]:
    slurm = tomllib.loads(SLURM_CONFIG.read_text())
    details = slurm["available_resources"]["slurm_resource"]["connection_details"]
    details.update(url=cluster.rest_url, jwt_key_file=str(cluster.jwt_key))
    paths = {"local": tmp / "local.toml", "slurm": tmp / "slurm.toml"}
    paths["local"].write_text(LOCAL_CONFIG.read_text())
    paths["slurm"].write_text(tomli_w.dumps(slurm))
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
        p50[label] = (percentile(running, 50), percentile(ready, 50))
        print(f"{label:16s} {p50[label][0]:11.3f}s {max(running):7.3f}s "
              f"{p50[label][1]:9.3f}s {max(ready):7.3f}s")
        emit(BENCH, f"{label}_start_to_running_p50", p50[label][0], "s")
        emit(BENCH, f"{label}_start_to_ready_p50", p50[label][1], "s")
    for index, what in ((0, "running"), (1, "ready")):
        ratio = p50["slurm"][index] / p50["local"][index]
        print(f"ratio slurm/local, start -> {what} p50: {ratio:.2f}")
        emit(BENCH, f"ratio_{what}_p50", ratio, "ratio")
    for side in sides:
        await side.api.aclose()
    return 0


def start_side(label: str, config: Path, url: str, temporal: str, tmp: Path, logs: Path,
               client_key: str, stack: contextlib.ExitStack) -> Side:
    data_dir = tmp / f"data-{label}"
    data_dir.mkdir(mode=0o755)
    port = free_port()
    env = {**os.environ, "UWS_DATABASE_URL": url, "UWS_TEMPORAL_ADDRESS": temporal,
           "UWS_DATA_DIR": str(data_dir), "UWS_CONFIG": str(config),
           "UWS_TASK_QUEUE": f"uws-bench-{label}-{secrets.token_hex(4)}",
           "UWS_HOST": HOST, "UWS_PORT": str(port)}
    worker = start_child([sys.executable, "-m", "app.cli", "worker"], env,
                         logs / f"worker-{label}.log")
    stack.callback(stop_process, worker)
    api = start_child([sys.executable, "-m", "app.cli", "api"], env, logs / f"api-{label}.log")
    stack.callback(stop_process, api)
    wait_for_port(HOST, port, timeout=60, proc=api, what=f"uws api ({label})")
    username = f"uwsbench{secrets.token_hex(4)}"
    # POST /tokens/ creates the OS account that runs the sessions (create_external_users).
    token = call_json(port, "POST", "/tokens/", {
        "client_token": client_key,
        "user_info": {"username": username, "email": f"{username}@example.org"},
    })["token"]
    stack.callback(subprocess.run, ["userdel", "--remove", username], capture_output=True)
    auth = {"UWS-Authorization": f"Token {token}"}
    workspace_id = create_workspace(port, auth)
    client = httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=30, headers=auth)
    return Side(label, client, workspace_id)


def run(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> int:
    os.chmod(tmp, 0o755)  # job users reach their workspaces under it
    logs = tmp / "logs"
    logs.mkdir()
    try:
        began = time.monotonic()
        cluster = slurm_dev.DevCluster(
            state_dir=tmp / "slurm", rest_port=free_port(), ctld_port=free_port(),
            slurmd_port=free_port(), cpus=4)
        stack.callback(slurm_dev.stop, cluster)
        slurm_dev.start(cluster, install_missing=False)
        url = stack.enter_context(database(tmp))
        client_key = asyncio.run(_prepare_database(url, logs / "migrate.log"))
        configs = write_configs(tmp, cluster)
        temporal_port = free_port()
        temporal = start_temporal_dev_server(tmp / "temporal", host=HOST, port=temporal_port,
                                             ui_port=free_port())
        stack.callback(stop_process, temporal)
        sides = [start_side(label, configs[label], url, f"{HOST}:{temporal_port}", tmp, logs,
                            client_key, stack) for label in ("local", "slurm")]
        print(f"stacks up in {time.monotonic() - began:.1f}s", flush=True)
        return asyncio.run(measure(sides, args.sessions))
    except Exception:
        _print_log_tails(logs)
        raise


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=5, help="sessions of each kind")
    args = parser.parse_args()
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    return args


def main() -> int:
    if os.geteuid() != 0 or not slurm_dev.installed():
        print(f"needs root and Slurm ({slurm_dev.ENABLE_HINT})", file=sys.stderr)
        return 2
    args = parse_args()
    print_machine()
    return run_with_cleanup(run, args)


if __name__ == "__main__":
    sys.exit(main())
