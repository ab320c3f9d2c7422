"""Starting, listing and stopping jobs over HTTP (the workflow runs on the real worker)."""

from __future__ import annotations

import pytest

from tests.api.test_workspaces import create
from tests.conftest import eventually, make_user_token


async def job_status(client, auth, job_id: int) -> dict:
    r = await client.get(f"/jobs/{job_id}/", headers=auth)
    assert r.status_code == 200
    return r.json()["data"]["jobs"][0]


async def wait_status(client, auth, job_id: int, *statuses: str, timeout: float = 60) -> dict:
    async def check():
        job = await job_status(client, auth, job_id)
        return job if job["status"] in statuses else None

    return await eventually(check, timeout=timeout, interval=0.2)


@pytest.mark.parametrize(("body", "code", "message"), [
    ({}, 400, "Missing job_type and no default job type set on workspace."),
    ({"job_type": "nope"}, 400, "nope is not in the list of available job types."),
    ({"job_type": "local_test_job", "job_details": []}, 400, "Job details not JSON."),
    ({"job_type": "local_test_job", "resource_options": "x"}, 400, "Resource options not JSON."),
    ({"job_type": "local_test_job", "resource_options": {"num_cpus": "a"}}, 422,
     "Invalid resource options found: [\"num_cpus: Value 'a' of type str does not match "
     "required type int. Skipping further validation of parameter num_cpus.\"]"),
    ({"job_type": "local_test_job", "resource_options": {"num_cpus": 0, "memory_mb": 99999}},
     422, "Invalid resource options found: [\"num_cpus: Value '0' not above minimum of 1.\", "
     "\"memory_mb: Value '99999' above maximum of 8192.\"]"),
    ({"job_type": "local_test_job", "resource_options": {"gpu_enabled": 1}}, 422,
     "Invalid resource options found: [\"gpu_enabled: Value '1' of type int does not match "
     "required type bool. Skipping further validation of parameter gpu_enabled.\"]"),
])
async def test_start_validation(client, auth, body, code, message) -> None:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth, json=body)
    assert r.status_code == code
    assert r.json() == {"success": False, "message": message}


async def test_start_run_complete_and_list(client, auth) -> None:
    ws = await create(client, auth, default_job_type="local_test_job")
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"resource_options": {"num_cpus": 2, "unknown_option": 5}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"] == "Successful start."
    job = body["data"]["job"]
    assert list(job) == ["id", "workspace_id", "resource_job_id", "job_type", "status",
                         "datetime_created", "datetime_start", "datetime_end", "core_hours",
                         "job_details"]
    assert job["status"] == "pending" and job["workspace_id"] == ws["id"]
    r = await client.get(f"/workspaces/{ws['id']}/", headers=auth)
    assert r.json()["data"]["workspaces"][0]["status"] == "active"
    done = await wait_status(client, auth, job["id"], "complete", "failed")
    assert done["status"] == "complete", done
    assert done["resource_job_id"] > 0
    assert done["core_hours"] > 0
    assert done["datetime_start"] and done["datetime_end"]
    r = await client.get("/jobs/", headers=auth, params={"workspace_id": ws["id"]})
    assert [j["id"] for j in r.json()["data"]["jobs"]] == [job["id"]]
    r = await client.get("/jobs/", headers=auth, params={"status": "no-such"})
    assert r.json()["message"] == "Job matching given parameters could not be found."

    async def idle():
        r = await client.get(f"/workspaces/{ws['id']}/", headers=auth)
        return r.json()["data"]["workspaces"][0]["status"] == "idle"

    await eventually(idle)


async def test_stop_and_stop_rules(client, auth, api_client_key) -> None:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "local_test_job",
                               "job_details": {"duration_seconds": 60}})
    job = r.json()["data"]["job"]
    r = await client.delete(f"/workspaces/{ws['id']}/", headers=auth)
    assert r.status_code == 400
    assert r.json()["message"] == "Cannot delete workspace, jobs are running for this workspace."
    other = {"UWS-Authorization": f"Token {await make_user_token(client, api_client_key)}"}
    r = await client.put(f"/jobs/{job['id']}/stop/", headers=other)
    assert r.status_code == 404
    assert r.json()["message"] == f"Job {job['id']} not found for user."
    for put_type in ("pause", "events"):  # events is a GET of ours, not a PUT type
        r = await client.put(f"/jobs/{job['id']}/{put_type}/", headers=auth)
        assert r.status_code == 400
        assert r.json()["message"] == "Invalid PUT type passed."
    r = await client.put(f"/jobs/{job['id']}/stop/", headers=auth)
    assert r.status_code == 200
    assert r.json()["message"] in ("Job queued to stop.", "Successful stop.")
    done = await wait_status(client, auth, job["id"], "complete", "failed")
    assert done["status"] == "complete"
    r = await client.put(f"/jobs/{job['id']}/stop/", headers=auth)
    assert r.status_code == 400
    assert r.json()["message"] == "This job is not running or pending."


async def test_events_timeline_and_extend(client, auth, api_client_key) -> None:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "local_test_job",
                               "job_details": {"duration_seconds": 30},
                               "resource_options": {"time_limit_min": 10}})
    job = r.json()["data"]["job"]
    await wait_status(client, auth, job["id"], "running")
    r = await client.put(f"/jobs/{job['id']}/extend/", headers=auth, json={"minutes": 5})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["time_limit_min"] == 15
    r = await client.put(f"/jobs/{job['id']}/extend/", headers=auth, json={"minutes": 470})
    assert r.status_code == 400
    assert r.json()["message"] == "The time limit cannot exceed 480 minutes (now 15)."
    r = await client.put(f"/jobs/{job['id']}/extend/", headers=auth, json={"minutes": "x"})
    assert r.json()["message"] == "'minutes' must be a positive integer."
    await client.put(f"/jobs/{job['id']}/stop/", headers=auth)
    await wait_status(client, auth, job["id"], "complete")

    async def workflow_done() -> list | None:
        # The row is final before the workflow's last step (the rescan) has run.
        r = await client.get(f"/jobs/{job['id']}/events/", headers=auth)
        found = r.json()["data"]["events"]
        return found if found[-1].get("detail") == "workflow completed" else None

    events = await eventually(workflow_done, timeout=60)
    statuses = [e["status"] for e in events if e["type"] == "status"]
    # The row starts pending (the start wrote it); a local job's first write is "running"
    # (launched and up, in one write).
    assert statuses[0] == "running" and "stopping" in statuses
    # The end is there too, with why.
    assert statuses[-1] == "complete"
    assert [e["detail"] for e in events if e.get("status") == "complete"] == ["Stopped by user."]
    # The page counts down from the limit, extensions included.
    r = await client.get(f"/jobs/{job['id']}/", headers=auth)
    assert r.json()["data"]["jobs"][0]["job_details"]["metrics"]["time_limit_min"] == 15
    kinds = {(e["type"], e.get("name")) for e in events}
    assert ("signal", "request_stop") in kinds and ("update", "extend_time_limit") in kinds
    assert events[-1] == {"time": events[-1]["time"], "type": "workflow",
                          "detail": "workflow completed"}
    other = {"UWS-Authorization": f"Token {await make_user_token(client, api_client_key)}"}
    r = await client.get(f"/jobs/{job['id']}/events/", headers=other)
    assert r.status_code == 404


async def test_operators_find_jobs_by_search_attributes(client, auth, temporal_env) -> None:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "local_test_job"})
    job = r.json()["data"]["job"]
    await wait_status(client, auth, job["id"], "complete")

    async def listed():
        query = (f'UwsJobId = {job["id"]} AND UwsWorkspaceId = {ws["id"]} AND '
                 f'UwsStatus = "complete" AND UwsJobType = "local_test_job"')
        return [w async for w in temporal_env.client.list_workflows(query)]

    found = await eventually(listed, timeout=30, interval=0.5)
    assert [w.id for w in found] == [f"job-{job['id']}"]
    description = await temporal_env.client.get_workflow_handle(found[0].id).describe()
    assert f"job {job['id']}" in (await description.static_summary() or "")
