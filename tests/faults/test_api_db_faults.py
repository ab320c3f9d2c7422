"""The API process SIGKILLed under live WebSocket subscribers, and PostgreSQL stopped for a
while under running jobs: clients reconnect and get the current state, requests meanwhile
get a clear 503 envelope, and every job still ends right."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.faults.helpers import (
    Subscriber,
    assert_consistent,
    distinct,
    eventually,
    new_user,
    new_workspace,
    start_job,
    wait_status,
)
from tests.stack import Stack

pytestmark = [pytest.mark.faults, pytest.mark.slow]

DB_DOWN = "The database is unavailable right now. Please try again shortly."


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("api-db-faults"), apis=1, workers=1)
    try:
        yield s.start()
    finally:
        s.close()


async def _final_seen(subs: list[Subscriber], jobs: list[int]) -> bool:
    return all(s.last(j) == "complete" for s in subs for j in jobs
               if s.path in ("/jobs/", f"/jobs/{j}/"))


async def test_api_restart_under_websocket_clients(stack: Stack, client_key: str) -> None:
    user = await new_user(stack, client_key)
    async with user.http() as http:
        ws = await new_workspace(http)
        jobs = [await start_job(http, ws, 15) for _ in range(2)]
    await wait_status(stack, jobs, ("running",))
    url = stack.ws_url(0, "")
    subs = [Subscriber([url], user.token, "/jobs/").start(),
            Subscriber([url], user.token, f"/jobs/{jobs[0]}/").start()]
    try:
        for sub in subs:
            await sub.wait_connected()
            await eventually(lambda sub=sub: _async(sub.last(jobs[0]) == "running"), 10)
        stack.apis[0].kill()
        killed = time.monotonic()
        await asyncio.sleep(1)
        stack.start_api(0)
        for sub in subs:
            await sub.wait_connected(2)
        back = time.monotonic() - killed
        # On connect, before any change: the current state of the jobs it watches.
        for sub in subs:
            since = sub.connects[1][1]
            watched = jobs if sub.path == "/jobs/" else jobs[:1]
            await eventually(lambda sub=sub, since=since, watched=watched: _async(all(
                sub.statuses(j, since)[:1] == ["running"] for j in watched)), 10,
                what=f"{sub.path}: current state after reconnecting")
        await eventually(lambda: _final_seen(subs, jobs), 60, what="final events")
        print(f"API SIGKILL: subscribers back after {back:.1f}s; events "
              f"{[[e['status'] for e in s.events] for s in subs]}")
    finally:
        for sub in subs:
            await sub.close()
    await assert_consistent(stack, dict.fromkeys(jobs, "complete"))


async def _async(value: object) -> object:
    return value


async def test_postgres_down_for_a_while(stack: Stack, client_key: str) -> None:
    user = await new_user(stack, client_key)
    async with user.http() as http:
        ws = await new_workspace(http)
        jobs = [await start_job(http, ws, 4) for _ in range(2)]
        await wait_status(stack, jobs, ("running",))
        url = stack.ws_url(0, "")
        subs = [Subscriber([url], user.token, "/jobs/").start(),
                Subscriber([url], user.token, f"/jobs/{jobs[0]}/").start()]
        try:
            for sub in subs:
                await sub.wait_connected()
            stack.pg.stop()
            stopped = time.monotonic()
            answers = {}
            for method, path, body in (("GET", "/workspaces/", None),
                                       ("PUT", f"/workspaces/{ws}/start/", {}),
                                       ("PUT", f"/jobs/{jobs[1]}/stop/", None),
                                       ("GET", "/users/me/quota/", None)):
                r = await http.request(method, path, json=body)
                answers[f"{method} {path}"] = (r.status_code, r.json())
            print(f"while PostgreSQL is down: {answers}")
            for status, body in answers.values():
                assert status == 503, answers
                assert body == {"success": False, "message": DB_DOWN}, answers
            # The jobs end on the resource meanwhile; their workflows wait to record it.
            await asyncio.sleep(max(0.0, 8 - (time.monotonic() - stopped)))
            stack.pg.start()
            restarted = time.monotonic()

            async def serving() -> bool:
                try:
                    return (await http.get("/workspaces/")).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(serving, 30, what="API serving again")
            api_back = time.monotonic() - restarted
            await assert_consistent(stack, dict.fromkeys(jobs, "complete"))
            final = time.monotonic() - restarted
            await eventually(lambda: _final_seen(subs, jobs), 30,
                             what="final events after the database returned")
            print(f"PostgreSQL down {restarted - stopped:.1f}s: API 200 again after "
                  f"{api_back:.1f}s, jobs final after {final:.1f}s; events "
                  f"{[distinct([e['status'] for e in s.events]) for s in subs]}")
        finally:
            for sub in subs:
                await sub.close()
