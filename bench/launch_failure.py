"""How fast a job that can never start is reported ``failed``, and why it failed.

For each case, ``--jobs`` jobs one after another (after one unmeasured warm-up job): the
time from sending ``PUT /workspaces/{id}/start/`` to the ``failed`` status arriving on the
job's WebSocket (``ws /jobs/{id}/``, ``UWS-Authorization`` header, opened as soon as the
start answers; it sends the job's current state first, so an end that came before it
connected arrives on connect). Then the reason each job ended with
(``current_job_details.message`` of ``GET /jobs/{id}/``) and how many retries of its
steps its socket showed.

- ``local``, "the job's program does not exist": ``tests/data/test-config.toml``
  (multi-user: as root each bench user is a real OS account, made by useradd with the
  comment ``uws-bench`` and removed with userdel at the end) with the local resource's
  ``shell = "/nonexistent/shell"``. The supervisor's exec fails, the job's process never
  exists, the job ends failed with "could not start the job: ...".
- ``slurm``, "the resource refuses the submission for good": a single-node Slurm
  cluster (``core/slurm_dev.py``, as ``bench/slurm_latency.py`` starts it) behind
  ``tests/data/slurm-config.toml`` with ``partition = "no-such-partition"``. Slurm refuses
  the submit, the worker's failure policy (``activities/failure_policy.py``) makes that
  non-retryable, the workflow ends the job failed with "Slurm refused the job: ...".
  Skipped, with one line, when Slurm is not installed.

Each case starts (and stops) its own PostgreSQL database, Temporal dev server, worker
and API (the helpers of ``bench.api_throughput``). Prints one line per job, then a
table (case, N, p50, max, reason); with ``UWS_BENCH_JSON`` set, appends the figures as
JSON lines. Exits 1 if any job does not end failed within ``--timeout`` s (60), 2 when
not root (the bench users are real OS accounts).

    .venv/bin/python bench/launch_failure.py [--jobs 10] [--timeout 60] [--only local,slurm]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import secrets
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # `python bench/launch_failure.py` puts bench/, not the repository, on the path.
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import tomli_w  # noqa: E402
from websockets.asyncio.client import connect as ws_connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from app import slurm_dev  # noqa: E402
from app.devstack import start_temporal_dev_server, stop_process  # noqa: E402
from bench.api_throughput import (  # noqa: E402
    HOST,
    ApiServer,
    _print_log_tails,
    call_json,
    create_workspace,
    database,
    free_port,
    print_machine,
    run_with_cleanup,
    start_child,
)
from bench.jobs_latency import kill_leftover_jobs, traversable_data_dir  # noqa: E402
from bench.report import emit, percentile  # noqa: E402

BENCH = "launch_failure"
ACCOUNT_COMMENT = "uws-bench"
USERADD_ARGS = ["--create-home", "--shell", "/bin/bash", "--comment", ACCOUNT_COMMENT]
MISSING_SHELL = "/nonexistent/shell"
MISSING_PARTITION = "no-such-partition"
TERMINAL = ("complete", "failed")
TIME_LIMIT_MIN = 5  # reserves little quota; no job here ever runs


# --- the two cases --------------------------------------------------------------------

def local_config(path: Path, _tmp: Path, _stack: contextlib.ExitStack) -> None:
    config = tomllib.loads((REPO / "tests" / "data" / "test-config.toml").read_text())
    auth = config["available_user_authentication"]["local_auth"]["connection_details"]
    auth["useradd_args"] = USERADD_ARGS
    resource = config["available_resources"]["local_resource"]["connection_details"]
    resource["shell"] = MISSING_SHELL
    path.write_text(tomli_w.dumps(config))


def slurm_config(path: Path, tmp: Path, stack: contextlib.ExitStack) -> None:
    """Start the cluster (as ``bench/slurm_latency.py`` does), then its config."""
    for directory in (tmp.parent, tmp):  # the cluster's own users reach its state dir
        os.chmod(directory, 0o755)
    cluster = slurm_dev.DevCluster(
        state_dir=tmp / "slurm", rest_port=free_port(), ctld_port=free_port(),
        slurmd_port=free_port(), cpus=4)
    stack.callback(slurm_dev.stop, cluster)
    slurm_dev.start(cluster, install_missing=False)
    config = tomllib.loads((REPO / "tests" / "data" / "slurm-config.toml").read_text())
    auth = config["available_user_authentication"]["local_auth"]["connection_details"]
    auth["useradd_args"] = USERADD_ARGS
    resource = config["available_resources"]["slurm_resource"]["connection_details"]
    resource.update(url=cluster.rest_url, jwt_key_file=str(cluster.jwt_key),
                    partition=MISSING_PARTITION)
    path.write_text(tomli_w.dumps(config))


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    configure: Callable[[Path, Path, contextlib.ExitStack], None]
    body: dict[str, Any]
    # Without the failure policy: what the same failure would do instead.
    without_policy: str


CASES = {
    "local": Case(
        "local", f"program missing (shell = {MISSING_SHELL})", local_config,
        {"job_type": "local_test_job", "job_details": {"duration_seconds": 1},
         "resource_options": {"time_limit_min": TIME_LIMIT_MIN}},
        "the same: the launch succeeds (the supervisor starts), the job's exec fails inside "
        "it, and the job ends failed when the supervisor records its end; no activity "
        "error for the policy to judge"),
    "slurm": Case(
        "slurm", f"Slurm refuses (partition = {MISSING_PARTITION})", slurm_config,
        {"job_type": "batch_script", "job_details": {"script": "#!/bin/sh\ntrue\n"},
         "resource_options": {"time_limit_min": TIME_LIMIT_MIN}},
        "launch_job's refusal would stay retryable: retried 1 s doubling to 30 s apart "
        "while the job shows pending ('launch attempt N failed: ...; retrying') until its "
        f"time limit ({TIME_LIMIT_MIN} min here) or a stop ends it, minutes later and "
        "without Slurm's reason; no failed status to time"),
}


# --- the stack ------------------------------------------------------------------------

def remove_account(name: str) -> None:
    """``userdel`` the bench's own account (only one carrying the bench's comment)."""
    try:
        if pwd.getpwnam(name).pw_gecos != ACCOUNT_COMMENT:
            return
    except KeyError:
        return  # never created
    done = subprocess.run(["userdel", "--remove", name], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"userdel {name} failed: {done.stderr.strip()}", file=sys.stderr)


def prepare_database(url: str, log: Path) -> str:
    """``_prepare_database`` in a fresh interpreter: Piccolo keeps the first database a
    process migrated, so the second case would migrate the first case's (dropped) one."""
    code = ("import asyncio, sys; from pathlib import Path; "
            "from bench.api_throughput import _prepare_database; "
            "print(asyncio.run(_prepare_database(sys.argv[1], Path(sys.argv[2]))))")
    done = subprocess.run([sys.executable, "-c", code, url, str(log)], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"migrating {url} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Stack:
    api_port: int
    token: str
    workspace_id: int
    username: str


def start_stack(case: Case, tmp: Path, logs: Path, stack: contextlib.ExitStack) -> Stack:
    config_path = tmp / "config.toml"
    case.configure(config_path, tmp, stack)
    url = stack.enter_context(database(tmp))
    client_key = prepare_database(url, logs / "migrate.log")
    (tmp / "constant.json").write_text("{}")  # bench.serve_api refuses to start without it
    temporal_port = free_port()
    temporal = start_temporal_dev_server(tmp / "temporal", host=HOST, port=temporal_port,
                                         ui_port=free_port())
    stack.callback(stop_process, temporal)
    # The jobs' accounts pass through it (search bit only), apart from the database.
    data_dir = traversable_data_dir(stack)
    stack.callback(kill_leftover_jobs, data_dir)  # after the worker stopped
    api_port = free_port()
    env = {**os.environ, "UWS_DATABASE_URL": url,
           "UWS_TEMPORAL_ADDRESS": f"{HOST}:{temporal_port}",
           "UWS_DATA_DIR": str(data_dir), "UWS_CONFIG": str(config_path),
           "UWS_TASK_QUEUE": f"uws-bench-{secrets.token_hex(4)}",
           "UWS_HOST": HOST, "UWS_PORT": str(api_port),
           "UWS_BENCH_CONSTANT_FILE": str(tmp / "constant.json")}
    worker = start_child([sys.executable, "-m", "app.cli", "worker"], env,
                         logs / "worker.log")
    stack.callback(stop_process, worker)
    api = ApiServer(env, api_port, logs / "serve_api.log")
    stack.callback(api.stop)
    api.start({})

    username = f"uwsbench{secrets.token_hex(4)}"
    stack.callback(remove_account, username)  # registered first: it may exist half-made
    # POST /tokens/ creates the OS account that runs the jobs (create_external_users).
    token = call_json(api_port, "POST", "/tokens/", {
        "client_token": client_key,
        "user_info": {"username": username, "email": f"{username}@example.org"},
    })["token"]
    auth = {"UWS-Authorization": f"Token {token}"}
    workspace_id = create_workspace(api_port, auth)
    wait_startable(api_port, workspace_id, auth)
    return Stack(api_port, token, workspace_id, username)


def wait_startable(port: int, workspace_id: int, auth: dict[str, str],
                   timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    status = "?"
    while time.monotonic() < deadline:
        reply = call_json(port, "GET", f"/workspaces/{workspace_id}/", headers=auth)
        status = reply["data"]["workspaces"][0]["status"]
        if status in ("idle", "active"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"workspace {workspace_id} still {status} after {timeout:.0f}s")


# --- one job --------------------------------------------------------------------------

@dataclass
class Outcome:
    job_id: int
    status: str  # the last status seen ("failed" when all went as expected)
    seconds: float | None  # start sent -> failed arrived; None when it did not
    reason: str
    retries: set[str] = field(default_factory=set)

    @property
    def failed(self) -> bool:
        return self.status == "failed" and self.seconds is not None


async def one_job(client: httpx.AsyncClient, st: Stack, case: Case,
                  timeout: float) -> Outcome:
    sent = time.monotonic()
    response = await client.put(f"/workspaces/{st.workspace_id}/start/", json=case.body)
    if response.status_code != 200:
        raise RuntimeError(f"start answered {response.status_code}: {response.text[:300]}")
    job_id = response.json()["data"]["job"]["id"]
    status, arrived, last_event = "pending", None, ""
    retries: set[str] = set()
    with contextlib.suppress(TimeoutError, ConnectionClosed):
        async with asyncio.timeout(max(0.0, sent + timeout - time.monotonic())), ws_connect(
                f"ws://{HOST}:{st.api_port}/jobs/{job_id}/",
                additional_headers={"UWS-Authorization": f"Token {st.token}"}) as sock:
            async for raw in sock:
                event = json.loads(raw)
                status = event["status"]
                last_event = event.get("current_job_details", {}).get("last_event") or ""
                if "retrying" in last_event:
                    retries.add(last_event)
                if status in TERMINAL:
                    arrived = time.monotonic()
                    break
    job = (await client.get(f"/jobs/{job_id}/")).json()["data"]["jobs"][0]
    current = (job.get("job_details") or {}).get("current_job_details") or {}
    reason = current.get("message") or ""
    if arrived is None:
        status = job["status"]
        reason = (f"did not end within {timeout:g}s (now {status}); "
                  f"last event: {last_event or '-'}")
    seconds = arrived - sent if arrived is not None and status == "failed" else None
    return Outcome(job_id, status, seconds, reason, retries)


# --- a case ---------------------------------------------------------------------------

@dataclass
class Result:
    case: Case
    outcomes: list[Outcome]
    warm_up: Outcome

    @property
    def ok(self) -> bool:
        return all(o.failed for o in [self.warm_up, *self.outcomes])


def show(tag: str, outcome: Outcome) -> None:
    took = f"{outcome.seconds:7.3f} s" if outcome.seconds is not None else "      - s"
    print(f"  {tag:>7} job {outcome.job_id:<4} {took}  {outcome.status:<8} "
          f"retries {len(outcome.retries)}  reason: {outcome.reason}", flush=True)


async def measure(case: Case, st: Stack, jobs: int, timeout: float) -> Result:
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{st.api_port}", timeout=30,
                                 headers={"UWS-Authorization": f"Token {st.token}"}) as client:
        warm_up = await one_job(client, st, case, timeout)
        show("warm-up", warm_up)
        outcomes: list[Outcome] = []
        if not warm_up.failed:
            return Result(case, outcomes, warm_up)
        for i in range(jobs):
            outcomes.append(await one_job(client, st, case, timeout))
            show(str(i + 1), outcomes[-1])
            if not outcomes[-1].failed:
                break  # the next ones would wait as long: the run has failed already
    return Result(case, outcomes, warm_up)


def run_case(case: Case, args: argparse.Namespace, tmp: Path) -> Result:
    logs = tmp / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as stack:
        try:
            began = time.monotonic()
            st = start_stack(case, tmp, logs, stack)
            print(f"\n{case.name}: {case.label}; stack up in {time.monotonic() - began:.1f}s; "
                  f"user {st.username}", flush=True)
            return asyncio.run(measure(case, st, args.jobs, args.timeout))
        except Exception:
            _print_log_tails(logs)
            raise


def report(results: list[Result], skipped: dict[str, str], jobs: int) -> None:
    print(f"\n{'case':<6} {'N':>3} {'p50 s':>7} {'max s':>7}  reason")
    for result in results:
        times = [o.seconds for o in result.outcomes if o.seconds is not None]
        p50 = percentile(times, 50) if times else float("nan")
        worst = max(times) if times else float("nan")
        if len(times) < jobs:
            worst = float("nan")  # a job that never failed has no time: no max either
        reasons = sorted({o.reason for o in [result.warm_up, *result.outcomes]})
        print(f"{result.case.name:<6} {len(times):>3} {p50:7.3f} {worst:7.3f}  "
              f"{reasons[0] if reasons else ''}")
        for extra in reasons[1:]:
            print(f"{'':<26}{extra}")
        emit(BENCH, f"{result.case.name} start -> failed p50", p50, "s")
        emit(BENCH, f"{result.case.name} start -> failed max", worst, "s")
        emit(BENCH, f"{result.case.name} jobs not failed", jobs - len(times), "count")
    for name, why in skipped.items():
        print(f"{name:<6} skipped: {why}")
    print("\nwithout the failure policy:")
    for result in results:
        retries = sum(len(o.retries) for o in [result.warm_up, *result.outcomes])
        print(f"  {result.case.name}: {result.case.without_policy} (retries seen here: "
              f"{retries})")


def run(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> int:
    results: list[Result] = []
    skipped: dict[str, str] = {}
    for name in args.only:
        if name == "slurm" and not slurm_dev.installed():
            skipped[name] = f"Slurm is not installed ({slurm_dev.ENABLE_HINT})"
            print(f"\nslurm: skipped, Slurm is not installed ({slurm_dev.ENABLE_HINT})")
            continue
        case_dir = tmp / name
        case_dir.mkdir()
        # One case's stack is stopped before the next one's starts.
        results.append(run_case(CASES[name], args, case_dir))
    report(results, skipped, args.jobs)
    failed = [r.case.name for r in results if not r.ok or len(r.outcomes) < args.jobs]
    if failed:
        print(f"\nnot every job ended failed within {args.timeout:g}s: {', '.join(failed)}")
    return 1 if failed else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10, help="measured jobs per case")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a job has to end failed")
    parser.add_argument("--only", default=",".join(CASES),
                        help=f"comma-separated cases ({', '.join(CASES)})")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    args.only = [n for n in args.only.split(",") if n]
    unknown = set(args.only) - set(CASES)
    if unknown or not args.only:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown)) or '(none)'}")
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("needs root: every bench user is a real OS account (useradd)", file=sys.stderr)
        return 2
    print_machine()
    return run_with_cleanup(run, args)


if __name__ == "__main__":
    sys.exit(main())
