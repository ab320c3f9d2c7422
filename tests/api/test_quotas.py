"""Quotas are checked and reserved before a launch and settled at the end."""

from __future__ import annotations

from db import quotas
from db.tables import Workspace
from tests.api.test_jobs import wait_status
from tests.api.test_workspaces import create, scanned


async def _user_id(client, auth) -> int:
    ws = await create(client, auth)
    row = await Workspace.select(Workspace.user).where(Workspace.id == ws["id"]).first()
    return row["user"]


async def test_core_hour_quota_refuses_with_numbers(client, auth, engine) -> None:
    uid = await _user_id(client, auth)
    await quotas.set_quota(uid, max_core_hours=1.0)
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth, json={
        "job_type": "local_test_job", "resource_options": {"num_cpus": 2, "time_limit_min": 60}})
    assert r.status_code == 400
    assert r.json()["message"] == (
        "Core-hour quota exceeded: this job needs 2.00 core-hours (2 CPUs x 60 minutes) but "
        "only 1.00 of your 1.00 remain (short by 1.00).")
    r = await client.get("/users/me/quota/", headers=auth)
    quota = r.json()["data"]["quota"]
    assert quota["max_core_hours"] == 1.0 and quota["reserved_core_hours"] == 0


async def test_reservation_settles_to_actual_use(client, auth, engine) -> None:
    uid = await _user_id(client, auth)
    await quotas.set_quota(uid, max_core_hours=10.0)
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth, json={
        "job_type": "local_test_job", "job_details": {"duration_seconds": 4},
        "resource_options": {"num_cpus": 3, "time_limit_min": 60}})
    assert r.status_code == 200, r.text
    job = r.json()["data"]["job"]
    quota = (await client.get("/users/me/quota/", headers=auth)).json()["data"]["quota"]
    assert quota["reserved_core_hours"] == 3.0
    # A second launch that would overrun what is left is refused while the first runs.
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth, json={
        "job_type": "local_test_job", "resource_options": {"num_cpus": 4, "time_limit_min": 120}})
    assert r.status_code == 400 and "short by 1.00" in r.json()["message"]
    done = await wait_status(client, auth, job["id"], "complete", "failed")
    quota = (await client.get("/users/me/quota/", headers=auth)).json()["data"]["quota"]
    assert quota["reserved_core_hours"] == 0
    assert abs(quota["used_core_hours"] - done["core_hours"]) < 1e-6
    assert 0 < done["core_hours"] < 0.1  # 3 CPUs for a few seconds, not the reservation


async def test_disk_quota(client, auth, engine) -> None:
    uid = await _user_id(client, auth)
    ws = await create(client, auth,
                      workspace_details={"files": [{"name": "f", "content": "x" * 100}]})
    await scanned(client, auth, ws["id"], {"/f"})  # so no rescan races the update below
    await Workspace.update({Workspace.disk_space: 2 * 1024**3}).where(Workspace.id == ws["id"])
    await quotas.set_quota(uid, max_disk_space=1024**3)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "local_test_job"})
    assert r.status_code == 400
    assert r.json()["message"].startswith(
        "Disk quota exceeded: your workspaces use 2.00 GiB of the 1.00 GiB allowed (over by "
        "1.00 GiB).")


async def test_quota_without_limits(client, auth) -> None:
    r = await client.get("/users/me/quota/", headers=auth)
    quota = r.json()["data"]["quota"]
    assert quota["max_core_hours"] is None and quota["max_disk_space"] is None
