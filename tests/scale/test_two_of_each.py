"""Two API processes and two workers on one PostgreSQL and one Temporal server: any API
process serves any request, every subscriber gets every status event whichever process it
is connected to, jobs spread over both workers, and SIGKILLing one API process and one
worker loses nothing."""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from temporalio.api.enums.v1 import EventType

from tests.faults.helpers import (
    BusListener,
    Subscriber,
    assert_consistent,
    distinct,
    eventually,
    new_user,
    new_workspace,
    start_job,
    temporal_client,
    wait_final,
    wait_status,
)
from tests.stack import Stack

pytestmark = [pytest.mark.faults, pytest.mark.scale, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("scale"), apis=2, workers=2)
    try:
        yield s.start()
    finally:
        s.close()


def _identity(stack: Stack, worker: int) -> str:
    """The Temporal identity of a worker process: the SDK's default, ``pid@host``."""
    return f"{stack.workers[worker].pid}@{socket.gethostname()}"


async def _workers_of(stack: Stack, job_ids: list[int]) -> dict[int, set[str]]:
    """Which worker identities started activities of each job (its workflow history)."""
    client = await temporal_client(stack)
    found: dict[int, set[str]] = {}
    for job_id in job_ids:
        history = await client.get_workflow_handle(f"job-{job_id}").fetch_history()
        found[job_id] = {
            e.activity_task_started_event_attributes.identity for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED}
    return found


async def test_any_api_process_serves_any_request(stack: Stack, client_key: str) -> None:
    user = await new_user(stack, client_key, api=0)
    async with user.http(stack.api_url(0)) as a, user.http(stack.api_url(1)) as b:
        ws = await new_workspace(a, "made-on-api0")
        r = await b.get(f"/workspaces/{ws}/")
        assert r.status_code == 200 and r.json()["data"]["workspaces"][0]["id"] == ws, r.text
        r = await b.put(f"/workspaces/{ws}/", json={"name": "renamed-on-api1"})
        assert r.status_code == 200, r.text
        r = await a.get(f"/workspaces/{ws}/")
        assert r.json()["data"]["workspaces"][0]["name"] == "renamed-on-api1", r.text
        job = await start_job(b, ws, 60)
        await wait_status(stack, [job], ("running",))
        r = await a.get(f"/jobs/{job}/")
        assert r.json()["data"]["jobs"][0]["status"] == "running", r.text
        r = await a.put(f"/jobs/{job}/stop/")
        assert r.status_code == 200, r.text
        await assert_consistent(stack, {job: "complete"})
        r = await b.delete(f"/workspaces/{ws}/")
        assert r.status_code == 200, r.text

        async def gone() -> bool:
            return (await a.get(f"/workspaces/{ws}/")).json()["data"]["workspaces"] == []

        await eventually(gone, 30, what="workspace deleted")


async def test_every_subscriber_gets_every_event(stack: Stack, client_key: str) -> None:
    users = [await new_user(stack, client_key, api=i % 2) for i in range(2)]
    subs = {(u.id, api): Subscriber([stack.ws_url(api, "")], u.token, "/jobs/").start()
            for u in users for api in (0, 1)}
    jobs: dict[int, int] = {}  # job id -> user id
    async with BusListener(stack) as bus:
        try:
            for sub in subs.values():
                await sub.wait_connected()
            https = [(u, u.http(stack.api_url(api))) for u in users for api in (0, 1)]
            workspaces = {u.id: await new_workspace(https[0 if u is users[0] else 2][1])
                          for u in users}
            for round_ in range(3):
                for user, http in https:  # starts alternate between the API processes
                    jobs[await start_job(http, workspaces[user.id], 1 + round_ % 2)] = user.id
            await wait_final(stack, list(jobs))
            expected = {job: distinct(bus.statuses(job)) for job in jobs}

            async def delivered() -> bool:
                return all(distinct(sub.statuses(job)) == expected[job]
                           for (uid, _), sub in subs.items()
                           for job, owner in jobs.items() if owner == uid)

            await eventually(delivered, 30, what="every event at every subscriber")
            for (uid, api), sub in subs.items():
                mine = [j for j, owner in jobs.items() if owner == uid]
                raw = sum(len(bus.statuses(j)) for j in mine)
                foreign = [e for e in sub.events if e.get("id") not in mine]
                assert not foreign, foreign  # nobody sees another user's jobs
                print(f"user {uid} on api{api}: {len(sub.events)} events received, {raw} "
                      f"published for its {len(mine)} jobs")
        finally:
            for sub in subs.values():
                await sub.close()
            for _, http in https:
                await http.aclose()
    await assert_consistent(stack, dict.fromkeys(jobs, "complete"))
    identities = {_identity(stack, i): f"worker{i}" for i in range(2)}
    by_job = await _workers_of(stack, list(jobs))
    per_worker = Counter(identities.get(i, i) for ids in by_job.values() for i in ids)
    print(f"jobs with activities on each worker: {dict(per_worker)} of {len(jobs)} jobs")
    assert set(per_worker) == set(identities.values()), by_job


async def test_kill_one_api_and_one_worker(stack: Stack, client_key: str) -> None:
    user = await new_user(stack, client_key)
    # Subscribed to api1 (to be killed); on failure they move to api0.
    urls = [stack.ws_url(1, ""), stack.ws_url(0, "")]
    subs = [Subscriber(urls, user.token, "/jobs/").start() for _ in range(2)]
    async with user.http(stack.api_url(0)) as a, user.http(stack.api_url(1)) as b:
        ws = await new_workspace(a)
        for sub in subs:
            await sub.wait_connected()
        jobs = [await start_job(http, ws, 8) for http in (a, b, a, b, a, b)]
    try:
        await wait_status(stack, jobs, ("running",))
        before = await _workers_of(stack, jobs)
        victim = _identity(stack, 1)
        stack.apis[1].kill()
        stack.workers[1].kill()
        killed = time.monotonic()
        for sub in subs:
            await sub.wait_connected(2)
            assert sub.connects[1][0] == 1, sub.connects  # now on api0
        # The current state on connect: every job, still running.
        for sub in subs:
            since = sub.connects[1][1]

            async def current(sub: Subscriber = sub, since: int = since) -> bool:
                return all(sub.statuses(j, since)[:1] == ["running"] for j in jobs)

            await eventually(current, 10, what="current state after failing over")
        await assert_consistent(stack, dict.fromkeys(jobs, "complete"))
        recovered = time.monotonic() - killed

        async def finals() -> bool:
            return all(sub.last(j) == "complete" for sub in subs for j in jobs)

        await eventually(finals, 30, what="final events on the surviving API")
    finally:
        for sub in subs:
            await sub.close()
    on_victim = [j for j, ids in before.items() if victim in ids]
    print(f"killed api1 + worker1: {len(on_victim)} of {len(jobs)} running jobs had their "
          f"activities on worker1; all complete {recovered:.1f}s after the kill")
