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
  cluster (``app/slurm_dev.py``, ``bench.harness.slurm_cluster``) behind
  ``tests/data/slurm-config.toml`` with ``partition = "no-such-partition"``. Slurm refuses
  the submit, the worker's failure policy (``activities/failure_policy.py``) makes that
  non-retryable, the workflow ends the job failed with "Slurm refused the job: ...".
  Skipped, with one line, when Slurm is not installed.

Each case starts (and stops) its own PostgreSQL database, Temporal dev server, worker
and API (``bench.harness.start_stack``). Prints one line per job, then a table (case, N,
p50, max, reason); with ``UWS_BENCH_JSON`` set, appends the figures as JSON lines. Exits
1 if any job does not end failed within ``--timeout`` s (60), 2 when not root (the bench
users are real OS accounts).

    .venv/bin/python bench/launch_failure.py [--jobs 10] [--timeout 60] [--only local,slurm]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

try:  # `python bench/x.py`: bench/, not the repository, is on sys.path; harness adds it
    import harness
except ModuleNotFoundError:  # `python -m bench.x`
    from bench import harness
from app import slurm_dev
from app.stack import HOST

BENCH = "launch_failure"
ACCOUNT_COMMENT = "uws-bench"
USERADD_ARGS = ["--create-home", "--shell", "/bin/bash", "--comment", ACCOUNT_COMMENT]
MISSING_SHELL = "/nonexistent/shell"
MISSING_PARTITION = "no-such-partition"
TERMINAL = ("complete", "failed")
TIME_LIMIT_MIN = 5  # reserves little quota; no job here ever runs


# --- the two cases --------------------------------------------------------------------

def local_config(path: Path, _stack: contextlib.ExitStack) -> None:
    config = tomllib.loads((harness.REPO / "tests" / "data" / "test-config.toml").read_text())
    auth = config["available_user_authentication"]["local_auth"]["connection_details"]
    auth["useradd_args"] = USERADD_ARGS
    resource = config["available_resources"]["local_resource"]["connection_details"]
    resource["shell"] = MISSING_SHELL
    harness.write_toml(path, config)


def slurm_config(path: Path, stack: contextlib.ExitStack) -> None:
    """Start the cluster, then its config."""
    config = harness.slurm_config(harness.slurm_cluster(stack))
    auth = config["available_user_authentication"]["local_auth"]["connection_details"]
    auth["useradd_args"] = USERADD_ARGS
    resource = config["available_resources"]["slurm_resource"]["connection_details"]
    resource["partition"] = MISSING_PARTITION
    harness.write_toml(path, config)


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    configure: Callable[[Path, contextlib.ExitStack], None]
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

@dataclass
class Stack:
    api_port: int
    token: str
    workspace_id: int
    username: str


def start_stack(case: Case, tmp: Path, logs: Path, stack: contextlib.ExitStack) -> Stack:
    config_path = tmp / "config.toml"
    case.configure(config_path, stack)
    st = harness.start_stack(stack, tmp, config=config_path, logs=logs)
    # POST /tokens/ creates the OS account that runs the jobs (create_external_users).
    user = st.new_user(workspaces=1)
    wait_startable(st.api_port, user.workspaces[0], user.auth)
    return Stack(st.api_port, user.token, user.workspaces[0], user.name)


def wait_startable(port: int, workspace_id: int, auth: dict[str, str],
                   timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    status = "?"
    while time.monotonic() < deadline:
        reply = harness.call_json(port, "GET", f"/workspaces/{workspace_id}/", headers=auth)
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


def run_case(case: Case, args: argparse.Namespace, tmp: Path, logs: Path) -> Result:
    with contextlib.ExitStack() as stack:
        began = time.monotonic()
        st = start_stack(case, tmp, logs, stack)
        print(f"\n{case.name}: {case.label}; stack up in {time.monotonic() - began:.1f}s; "
              f"user {st.username}", flush=True)
        return asyncio.run(measure(case, st, args.jobs, args.timeout))


def report(results: list[Result], skipped: dict[str, str], jobs: int) -> None:
    print(f"\n{'case':<6} {'N':>3} {'p50 s':>7} {'max s':>7}  reason")
    for result in results:
        times = [o.seconds for o in result.outcomes if o.seconds is not None]
        p50 = harness.percentile(times, 50) if times else float("nan")
        worst = max(times) if times else float("nan")
        if len(times) < jobs:
            worst = float("nan")  # a job that never failed has no time: no max either
        reasons = sorted({o.reason for o in [result.warm_up, *result.outcomes]})
        print(f"{result.case.name:<6} {len(times):>3} {p50:7.3f} {worst:7.3f}  "
              f"{reasons[0] if reasons else ''}")
        for extra in reasons[1:]:
            print(f"{'':<26}{extra}")
        harness.emit(BENCH, f"{result.case.name} start -> failed p50", p50, "s")
        harness.emit(BENCH, f"{result.case.name} start -> failed max", worst, "s")
        harness.emit(BENCH, f"{result.case.name} jobs not failed", jobs - len(times), "count")
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
        results.append(run_case(CASES[name], args, case_dir, tmp / "logs" / name))
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
    args = harness.checked_args(parser, at_least_one=("--jobs",))
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
    harness.print_machine()
    return harness.run_with_cleanup(run, args)


if __name__ == "__main__":
    sys.exit(main())
