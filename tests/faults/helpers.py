"""What fault and scale tests share: an HTTP client per user, WebSocket subscribers that
reconnect, a listener on the status bus, and ``assert_consistent``: the jobs table, the
workflows and the file system tell the same story about every job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import websockets
from temporalio.client import Client, WorkflowExecutionStatus

from tests.stack import ENDED, STARTED, Stack, process_alive, read_record

FINAL = ("complete", "failed")
OUTPUT_FILE = "test_job_output.txt"


async def eventually(check, timeout: float = 60.0, interval: float = 0.2, what: str = ""):
    """``await check()`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {timeout}s "
                                 f"(last: {value!r})")
        await asyncio.sleep(interval)


@dataclass
class User:
    """A user of the stack with an HTTP client bound to one API process."""

    id: int
    name: str
    token: str
    base_url: str

    @property
    def headers(self) -> dict[str, str]:
        return {"UWS-Authorization": f"Token {self.token}"}

    def http(self, base_url: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base_url or self.base_url, headers=self.headers,
                                 timeout=60)


async def new_user(stack: Stack, client_key: str, api: int = 0,
                   max_core_hours: float | None = 1000.0) -> User:
    """A fresh user (``POST /tokens/``) with a quota row, so reservations are visible."""
    name = f"u{secrets.token_hex(4)}"
    async with httpx.AsyncClient(base_url=stack.api_url(api), timeout=60) as http:
        r = await http.post("/tokens/", json={
            "client_token": client_key,
            "user_info": {"username": name, "email": f"{name}@example.org"}})
        assert r.status_code == 200, r.text
        token = r.json()["token"]
    conn = await asyncpg.connect(stack.database_url)
    try:
        user_id = await conn.fetchval("SELECT id FROM uws_user WHERE username = $1", name)
        if max_core_hours is not None:
            await conn.execute(
                'INSERT INTO uws_user_quota ("user", max_core_hours, used_disk_space, '
                "used_core_hours, reserved_core_hours) VALUES ($1, $2, 0, 0, 0)",
                user_id, max_core_hours)
    finally:
        await conn.close()
    return User(id=user_id, name=name, token=token, base_url=stack.api_url(api))


async def new_workspace(http: httpx.AsyncClient, name: str = "ws") -> int:
    r = await http.post("/workspaces/", json={"name": name, "description": "fault test",
                                              "default_job_type": "local_test_job"})
    assert r.status_code == 200, r.text
    return r.json()["data"]["workspace"]["id"]


async def start_job(http: httpx.AsyncClient, workspace_id: int, seconds: float) -> int:
    r = await http.put(f"/workspaces/{workspace_id}/start/",
                       json={"job_details": {"duration_seconds": seconds},
                             "resource_options": {"time_limit_min": 10}})
    assert r.status_code == 200, r.text
    return r.json()["data"]["job"]["id"]


async def db_fetch(stack: Stack, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(stack.database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def job_statuses(stack: Stack, job_ids: list[int]) -> dict[int, str]:
    rows = await db_fetch(stack, "SELECT id, status FROM uws_job WHERE id = ANY($1)", job_ids)
    return {r["id"]: r["status"] for r in rows}


async def wait_status(stack: Stack, job_ids: list[int], wanted: tuple[str, ...],
                      timeout: float = 60) -> dict[int, str]:
    async def check() -> dict[int, str] | None:
        now = await job_statuses(stack, job_ids)
        return now if all(now.get(j) in wanted for j in job_ids) else None

    return await eventually(check, timeout, what=f"jobs {job_ids} in {wanted}")


# --- live status --------------------------------------------------------------------------


class BusListener:
    """``LISTEN`` on the status channel from the test itself: every event published, the
    reference the subscribers' streams are compared with."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.events: list[dict[str, Any]] = []
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> BusListener:
        self._conn = await asyncpg.connect(self.stack.database_url)
        await self._conn.add_listener(
            "uws_job_status", lambda *a: self.events.append(json.loads(a[3])))
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)

    def statuses(self, job_id: int) -> list[str]:
        return [e["status"] for e in self.events if e["id"] == job_id]


@dataclass
class Subscriber:
    """A WebSocket client of ``path`` that reconnects whenever its socket drops, trying
    ``urls`` in turn (the next API process when its own one is gone)."""

    urls: list[str]
    token: str
    path: str = "/jobs/"
    events: list[dict[str, Any]] = field(default_factory=list)
    connects: list[tuple[int, int]] = field(default_factory=list)  # (url index, event index)
    _task: asyncio.Task[None] | None = None

    def start(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        index = 0
        while True:
            url = f"{self.urls[index]}{self.path}?token={self.token}"
            try:
                async with websockets.connect(url, open_timeout=5) as sock:
                    self.connects.append((index, len(self.events)))
                    async for message in sock:
                        self.events.append(json.loads(message))
            except (OSError, websockets.WebSocketException, TimeoutError):
                pass
            index = (index + 1) % len(self.urls)
            await asyncio.sleep(0.2)

    async def wait_connected(self, times: int = 1, timeout: float = 30) -> None:
        async def check() -> bool:
            return len(self.connects) >= times

        await eventually(check, timeout, 0.05, what=f"{self.path} connected {times}x")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def statuses(self, job_id: int, since: int = 0) -> list[str]:
        return [e["status"] for e in self.events[since:] if e.get("id") == job_id]

    def last(self, job_id: int) -> str | None:
        found = self.statuses(job_id)
        return found[-1] if found else None


def distinct(statuses: list[str]) -> list[str]:
    """Consecutive repeats collapsed (a status re-published with a new detail)."""
    out: list[str] = []
    for s in statuses:
        if not out or out[-1] != s:
            out.append(s)
    return out


# --- consistency ----------------------------------------------------------------------------


async def temporal_client(stack: Stack) -> Client:
    return await Client.connect(stack.temporal_address)


async def wait_final(stack: Stack, job_ids: list[int], timeout: float = 120) -> None:
    """Every job's row final and its workflow closed."""
    await wait_status(stack, job_ids, FINAL, timeout)
    client = await temporal_client(stack)

    async def closed() -> bool:
        for job_id in job_ids:
            desc = await client.get_workflow_handle(f"job-{job_id}").describe()
            if desc.status == WorkflowExecutionStatus.RUNNING:
                return False
        return True

    await eventually(closed, timeout, 0.3, what=f"workflows of {job_ids} closed")


async def assert_consistent(stack: Stack, expected: dict[int, str],
                            launched: dict[int, bool] | None = None) -> dict[int, dict]:
    """The database, Temporal and the file system agree about every job of ``expected``
    (job id -> final status): the row is final with an end time, the workflow completed
    with that status as its result and search attribute, the job ran on the resource
    exactly once (one "started" line in its output and one supervised start on record:
    none of either for a job stopped before its launch, when ``launched`` says so) and
    nothing of it still runs: its supervisor recorded the end and is gone, and so is the
    job's process; its workspace is idle again; each
    owner's quota has no reservation left and counts exactly the core-hours of its jobs.
    Returns the rows, for reports."""
    job_ids = list(expected)
    await wait_final(stack, job_ids)
    rows = {r["id"]: dict(r) for r in await db_fetch(
        stack, 'SELECT j.id, j.status, j.datetime_end, j.core_hours, j.resource_job_id, '
        'j."user", j.workspace, j.job_details, w.file_path, w.status AS ws_status '
        "FROM uws_job j JOIN uws_workspace w ON w.id = j.workspace WHERE j.id = ANY($1)",
        job_ids)}
    client = await temporal_client(stack)
    for job_id, status in expected.items():
        row = rows[job_id]
        assert row["status"] == status, (job_id, row)
        assert row["datetime_end"] is not None, (job_id, row)
        handle = client.get_workflow_handle(f"job-{job_id}")
        desc = await handle.describe()
        assert desc.status == WorkflowExecutionStatus.COMPLETED, (job_id, desc.status)
        assert await handle.result() == status, job_id
        assert desc.search_attributes.get("UwsStatus") == [status], (
            job_id, desc.search_attributes)

        workdir = Path(row["file_path"]) / ".jobs" / str(job_id)
        output = workdir / OUTPUT_FILE
        started = output.read_text().count("started") if output.exists() else 0
        ran = row["resource_job_id"] != -1 if launched is None else launched[job_id]
        assert started == (1 if ran else 0), (job_id, started, row)
        # What the local resource's supervisor recorded, in the server's own state.
        state = stack.job_state_dir(job_id)
        start_record = read_record(state / STARTED)
        end_record = read_record(state / ENDED)
        if ran:
            assert row["core_hours"] > 0, (job_id, row)
            assert start_record is not None, f"job {job_id}: no {STARTED} in {state}"
            assert start_record["job_pid"] == row["resource_job_id"], (job_id, start_record)
            assert not process_alive(start_record["supervisor_pid"],
                                     start_record.get("supervisor_ticks")), (
                f"job {job_id}: its supervisor still runs", start_record)
            assert not process_alive(start_record["job_pid"], start_record.get("job_ticks")), (
                f"job {job_id} still runs", start_record)
            assert end_record is not None, f"job {job_id}: no {ENDED} in {state}"
            assert end_record["ended_at"] >= start_record["started_at"], (
                job_id, start_record, end_record)
        else:
            assert start_record is None and end_record is None, (
                f"job {job_id} never launched, yet its supervisor recorded", start_record,
                end_record)
        assert row["ws_status"] == "idle", (job_id, row["ws_status"])

    for user_id in {r["user"] for r in rows.values()}:
        quota = await db_fetch(
            stack, 'SELECT used_core_hours, reserved_core_hours FROM uws_user_quota '
            'WHERE "user" = $1', user_id)
        total = await db_fetch(
            stack, 'SELECT COALESCE(SUM(core_hours), 0) AS s, COUNT(*) FILTER '
            "(WHERE status IN ('pending', 'running', 'stopping')) AS active "
            'FROM uws_job WHERE "user" = $1', user_id)
        if quota and total[0]["active"] == 0:
            reserved = quota[0]["reserved_core_hours"]
            assert reserved == pytest.approx(0.0, abs=1e-9), (user_id, quota[0])
            assert abs(quota[0]["used_core_hours"] - total[0]["s"]) < 1e-9, (
                user_id, quota[0], total[0])
    return rows

