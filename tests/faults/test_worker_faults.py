"""The worker SIGKILLed in each phase of a job (launching, running, stopping, and jobs
still pending while no worker runs), and the Temporal dev server restarted on its SQLite
file: a new worker finishes every job, each ran once on the resource, and the jobs table,
the workflows, the job directories and the local resource's own records agree."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.faults.helpers import (
    assert_consistent,
    db_fetch,
    new_user,
    new_workspace,
    start_job,
    wait_status,
)
from tests.stack import STARTED, Stack

# The local resource's records of a launch under way (controllers/resources/local/).
SPEC, SUPERVISOR_LOG = "spec.json", "supervisor.log"

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("worker-faults"), apis=1, workers=1)
    try:
        yield s.start()
    finally:
        s.close()


def _kill_inside_launch(stack: Stack, job_ids: list[int],
                        timeout: float = 30) -> dict[str, int | bool]:
    """SIGKILL target: the first moment a launch of one of ``job_ids`` wrote the spec its
    supervisor runs. Returns what that launch had done by then (a busy loop on purpose:
    the window, until the supervisor records the start, is milliseconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job_id in job_ids:
            state = stack.job_state_dir(job_id)
            if (state / SPEC).exists():
                return {"job": job_id, "spec": True,
                        "supervisor_log": (state / SUPERVISOR_LOG).exists(),
                        "started": (state / STARTED).exists()}
        time.sleep(0.001)
    raise AssertionError(f"no launch of {job_ids} began")


async def test_worker_killed_during_launch(stack: Stack, client_key: str) -> None:
    user = await new_user(stack, client_key)
    async with user.http() as http:
        ws = await new_workspace(http)
        jobs = [await start_job(http, ws, 2) for _ in range(3)]
    seen = await asyncio.to_thread(_kill_inside_launch, stack, jobs)
    stack.workers[0].kill()
    print(f"worker killed inside a launch: {seen}")
    stack.start_worker(0)
    started = time.monotonic()
    await assert_consistent(stack, dict.fromkeys(jobs, "complete"))
    print(f"launch kill: all {len(jobs)} jobs complete {time.monotonic() - started:.1f}s "
          "after the new worker started")


async def test_worker_killed_while_running_stopping_and_pending(
    stack: Stack, client_key: str
) -> None:
    user = await new_user(stack, client_key)
    async with user.http() as http:
        ws = await new_workspace(http)
        running = [await start_job(http, ws, 6) for _ in range(2)]
        to_stop = await start_job(http, ws, 300)
        await wait_status(stack, [*running, to_stop], ("running",))
        r = await http.put(f"/jobs/{to_stop}/stop/")
        assert r.status_code == 200, r.text
        stack.workers[0].kill()
        at_kill = await db_fetch(stack, "SELECT id, status FROM uws_job WHERE id = ANY($1)",
                                 [*running, to_stop])
        # Started while no worker runs: it stays pending, with its workflow waiting.
        pending = await start_job(http, ws, 1)
        await asyncio.sleep(1)
        assert (await db_fetch(stack, "SELECT status FROM uws_job WHERE id = $1",
                               pending))[0]["status"] == "pending"
    print(f"at the kill: { {r['id']: r['status'] for r in at_kill} }")
    stack.start_worker(0)
    started = time.monotonic()
    rows = await assert_consistent(stack, dict.fromkeys([*running, to_stop, pending],
                                                        "complete"))
    print(f"running/stopping/pending kill: all complete {time.monotonic() - started:.1f}s "
          "after the new worker started")
    message = rows[to_stop]["job_details"]
    assert "Stopped by user." in str(message), message


async def test_temporal_restart(stack: Stack, client_key: str) -> None:
    user = await new_user(stack, client_key)
    async with user.http() as http:
        ws = await new_workspace(http)
        running = [await start_job(http, ws, 5) for _ in range(2)]
        await wait_status(stack, running, ("running",))
        stack.temporal.kill()
        # A job started while Temporal is down: the API keeps trying for a while, then
        # either gets through (Temporal is back) or answers 503 and fails the job's row.
        attempt = asyncio.create_task(http.put(
            f"/workspaces/{ws}/start/", json={"job_details": {"duration_seconds": 1}}))
        await asyncio.sleep(2)
        stack.start_temporal()
        restarted = time.monotonic()
        r = await attempt
    print(f"start while Temporal was down: {r.status_code} {r.text[:200]}")
    expected = dict.fromkeys(running, "complete")
    if r.status_code == 200:
        expected[r.json()["data"]["job"]["id"]] = "complete"
    else:
        assert r.status_code == 503, r.text
        assert r.json()["success"] is False
        assert "workflow service is unavailable" in r.json()["message"]
    await assert_consistent(stack, expected)
    print(f"Temporal restart: jobs final {time.monotonic() - restarted:.1f}s after restart")


async def test_stop_while_temporal_down(stack: Stack, client_key: str) -> None:
    """A stop sent while the Temporal server is down: the API's client retries for a
    while, then answers 503 with the row unchanged; a stop in flight when Temporal comes
    back gets through. Either way the job is stopped by the user, not by its time limit."""
    user = await new_user(stack, client_key)
    async with user.http() as http:
        ws = await new_workspace(http)
        job = await start_job(http, ws, 300)
        await wait_status(stack, [job], ("running",))
        stack.temporal.kill()
        try:
            began = time.monotonic()
            down = await http.put(f"/jobs/{job}/stop/")
            print(f"stop while Temporal down: {down.status_code} after "
                  f"{time.monotonic() - began:.1f}s: {down.text[:200]}")
            assert down.status_code == 503, down.text
            assert down.json() == {"success": False, "message": "The workflow service is "
                                   "unavailable right now. Please try again shortly."}
            rows = await db_fetch(stack, "SELECT status FROM uws_job WHERE id = $1", job)
            assert rows[0]["status"] == "running"  # unchanged: the retry is not refused
            # The client's retry, sent while Temporal is still down; Temporal comes back
            # while the API's client is still retrying the signal.
            retry = asyncio.create_task(http.put(f"/jobs/{job}/stop/"))
            await asyncio.sleep(2)
        finally:
            stack.start_temporal()
        r = await retry
        print(f"stop retried across the restart: {r.status_code} after "
              f"{time.monotonic() - began:.1f}s: {r.text[:200]}")
        assert r.status_code == 200, r.text
        assert r.json() == {"success": True, "message": "Job queued to stop."}
    rows = await assert_consistent(stack, {job: "complete"})
    assert "Stopped by user." in str(rows[job]["job_details"]), rows[job]
