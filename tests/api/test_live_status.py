"""Live job status over WebSockets, fed by PostgreSQL NOTIFY."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from tests.api.test_workspaces import create
from tests.conftest import make_user_token


def ws_url(server_url: str, path: str) -> str:
    return server_url.replace("http://", "ws://") + path


async def statuses_until(sock, final: set[str], timeout: float = 60) -> list[dict]:
    seen: list[dict] = []
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await sock.recv())
            seen.append(event)
            if event["status"] in final:
                return seen


async def test_job_status_pushed_pending_running_complete(client, server_url, auth) -> None:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "local_test_job"})
    job = r.json()["data"]["job"]
    async with websockets.connect(ws_url(server_url, f"/jobs/{job['id']}/"),
                                  additional_headers=auth) as sock:
        events = await statuses_until(sock, {"complete", "failed"})
    order = [e["status"] for e in events]
    assert order[-1] == "complete", events
    # The first message is the current state; later ones follow the job's life in order.
    deduped = [s for i, s in enumerate(order) if i == 0 or s != order[i - 1]]
    assert deduped in (["pending", "running", "complete"], ["running", "complete"]), order
    assert all(e["id"] == job["id"] for e in events)
    r = await client.get(f"/jobs/{job['id']}/", headers=auth)
    assert r.json()["data"]["jobs"][0]["core_hours"] > 0


async def test_all_jobs_socket_with_query_token(client, server_url, user_token, auth) -> None:
    ws = await create(client, auth)
    async with websockets.connect(ws_url(server_url, f"/jobs/?token={user_token}")) as sock:
        r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                             json={"job_type": "local_test_job"})
        job_id = r.json()["data"]["job"]["id"]
        events = await statuses_until(sock, {"complete", "failed"})
    assert {e["id"] for e in events} == {job_id}
    assert events[-1]["status"] == "complete"


async def test_bad_token_closes_4401(server_url) -> None:
    async with websockets.connect(ws_url(server_url, "/jobs/1/?token=nope")) as sock:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await sock.recv()
    assert info.value.rcvd.code == 4401


async def test_someone_elses_job_closes_4404(client, server_url, auth, api_client_key) -> None:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "local_test_job"})
    job_id = r.json()["data"]["job"]["id"]
    other = await make_user_token(client, api_client_key)
    async with websockets.connect(ws_url(server_url, f"/jobs/{job_id}/"),
                                  additional_headers={"UWS-Authorization": f"Token {other}"}
                                  ) as sock:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await sock.recv()
    assert info.value.rcvd.code == 4404
