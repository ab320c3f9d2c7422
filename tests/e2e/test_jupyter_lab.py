"""A real JupyterLab started through the API reaches "Webserver ready." with connection
details that answer HTTP; stopping the job ends it."""

from __future__ import annotations

import httpx
import pytest

from tests.api.test_jobs import wait_status
from tests.api.test_workspaces import create
from tests.conftest import eventually


@pytest.mark.slow
async def test_jupyter_lab_session(client, auth) -> None:
    ws = await create(client, auth, workspace_details={
        "files": [{"name": "hello.py", "content": "print('hi')"}]})
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "jupyter_lab"})
    assert r.status_code == 200, r.text
    job_id = r.json()["data"]["job"]["id"]

    async def ready() -> dict | None:
        r = await client.get(f"/jobs/{job_id}/", headers=auth)
        job = r.json()["data"]["jobs"][0]
        assert job["status"] in ("pending", "running"), job
        details = job["job_details"]["current_job_details"]
        return details if details.get("message") == "Webserver ready." else None

    details = await eventually(ready, timeout=120, interval=0.5)
    proxy = details["proxy_details"]
    connection = details["connection_details"]
    assert connection["url_path"].startswith(f"/passthrough/{proxy['hostname']}/{job_id}/")
    token = connection["url_path"].split("token=")[1]
    base = f"http://{proxy['hostname']}:{proxy['port']}{proxy['path']}"
    async with httpx.AsyncClient() as direct:
        r = await direct.get(base + "api/contents/", params={"token": token})
        assert r.status_code == 200
        assert "hello.py" in {item["name"] for item in r.json()["content"]}
    async with httpx.AsyncClient() as stranger:  # no token, no cookie from the above
        assert (await stranger.get(base + "api/contents/")).status_code == 403

    r = await client.put(f"/jobs/{job_id}/stop/", headers=auth)
    assert r.status_code == 200
    done = await wait_status(client, auth, job_id, "complete", "failed", timeout=60)
    assert done["status"] == "complete"
    async with httpx.AsyncClient() as direct:
        with pytest.raises(httpx.ConnectError):
            await direct.get(base + "api/status", params={"token": token})
