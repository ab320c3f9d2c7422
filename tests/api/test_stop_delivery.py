"""A stop always reaches the job's workflow: it is signalled before the row says
``stopping``, a repeated stop signals again (answered with the contract's 400 for a job
already stopping), and a stop Temporal could not take changes nothing, so the client's
retry works."""

from __future__ import annotations

from typing import Any

from temporalio.service import RPCError, RPCStatusCode

from db import jobs as job_rows
from tests.api.test_jobs import job_status, wait_status
from tests.api.test_workspaces import create
from workflows.models import job_workflow_id

QUEUED = {"success": True, "message": "Job queued to stop."}
ALREADY = {"success": False, "message": "This job is not running or pending."}


async def _running_job(client, auth, seconds: int = 120) -> dict[str, Any]:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "local_test_job",
                               "job_details": {"duration_seconds": seconds}})
    assert r.status_code == 200, r.text
    job = r.json()["data"]["job"]
    # Running: it reached the resource, so a stop is "queued" (not "Successful stop.").
    return await wait_status(client, auth, job["id"], "running")


async def _stopped_by_user(client, auth, job_id: int) -> dict[str, Any]:
    done = await wait_status(client, auth, job_id, "complete", "failed", timeout=60)
    assert done["status"] == "complete", done
    assert done["job_details"]["current_job_details"]["message"] == "Stopped by user.", done
    return done


async def _history_counts(temporal_env, job_id: int) -> tuple[int, int]:
    """(``request_stop`` signals received, ``stop_job`` activities scheduled)."""
    history = await temporal_env.client.get_workflow_handle(
        job_workflow_id(job_id)).fetch_history()
    signals = sum(1 for e in history.events
                  if e.HasField("workflow_execution_signaled_event_attributes")
                  and e.workflow_execution_signaled_event_attributes.signal_name
                  == "request_stop")
    stops = sum(1 for e in history.events
                if e.HasField("activity_task_scheduled_event_attributes")
                and e.activity_task_scheduled_event_attributes.activity_type.name
                == "stop_job")
    return signals, stops


async def test_stop_twice_is_one_stop(client, auth, temporal_env) -> None:
    job = await _running_job(client, auth)
    first = await client.put(f"/jobs/{job['id']}/stop/", headers=auth)
    second = await client.put(f"/jobs/{job['id']}/stop/", headers=auth)
    assert (first.status_code, first.json()) == (200, QUEUED)
    assert (second.status_code, second.json()) == (400, ALREADY)
    await _stopped_by_user(client, auth, job["id"])
    # Both signals reached the workflow; it stopped the job once.
    assert await _history_counts(temporal_env, job["id"]) == (2, 1)
    r = await client.put(f"/jobs/{job['id']}/stop/", headers=auth)
    assert (r.status_code, r.json()["message"]) == (400, "This job is not running or pending.")


async def test_a_row_already_stopping_still_gets_its_signal(client, auth, temporal_env) -> None:
    """A row left ``stopping`` by a stop whose signal never arrived (what the old order
    allowed): the next stop signals the workflow, which stops the job."""
    job = await _running_job(client, auth)
    assert await job_rows.record_status(job["id"], "stopping", event="stop requested")
    assert await _history_counts(temporal_env, job["id"]) == (0, 0)
    r = await client.put(f"/jobs/{job['id']}/stop/", headers=auth)
    assert (r.status_code, r.json()) == (400, ALREADY)  # the contract's answer, yet...
    await _stopped_by_user(client, auth, job["id"])  # ... stopped, long before its 120 s
    assert await _history_counts(temporal_env, job["id"]) == (1, 1)


class _Unreachable:
    """The app's Temporal client with its signals failing as when the server is down."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.attempts = 0

    def get_workflow_handle(self, workflow_id: str, **kwargs: Any) -> Any:
        outer = self

        class Handle:
            async def signal(self, *args: Any, **kw: Any) -> None:
                outer.attempts += 1
                raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")

        return Handle()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


async def test_stop_while_temporal_unreachable_changes_nothing(
    client, auth, app, temporal_env, monkeypatch
) -> None:
    job = await _running_job(client, auth)
    state = app.app.state.uws  # AppendSlash wraps the Litestar app
    unreachable = _Unreachable(state.temporal)
    monkeypatch.setattr(state, "temporal", unreachable)
    r = await client.put(f"/jobs/{job['id']}/stop/", headers=auth)
    monkeypatch.undo()  # for this one request only
    assert unreachable.attempts == 1
    assert r.status_code == 503, r.text
    assert r.json() == {"success": False, "message": "The workflow service is unavailable "
                                                     "right now. Please try again shortly."}
    row = await job_status(client, auth, job["id"])
    assert row["status"] == "running", row
    assert await _history_counts(temporal_env, job["id"]) == (0, 0)
    # The client's retry: an ordinary stop.
    r = await client.put(f"/jobs/{job['id']}/stop/", headers=auth)
    assert (r.status_code, r.json()) == (200, QUEUED)
    await _stopped_by_user(client, auth, job["id"])
