"""A real JupyterLab started through the API reaches "Webserver ready." with connection
details that answer HTTP, directly and through the authenticated passthrough; only its
owner passes, only while it runs."""

from __future__ import annotations

import os
import stat
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from db import sql
from tests.api.test_jobs import wait_status
from tests.api.test_workspaces import create
from tests.conftest import eventually, make_user_token


async def start_lab(client, auth) -> tuple[int, dict]:
    ws = await create(client, auth, workspace_details={
        "files": [{"name": "hello.py", "content": "print('hi')"}]})
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "jupyter_lab"})
    assert r.status_code == 200, r.text
    job_id = r.json()["data"]["job"]["id"]

    async def ready() -> dict | None:
        r = await client.get(f"/jobs/{job_id}/", headers=auth)
        job = r.json()["data"]["jobs"][0]
        assert job["status"] in ("pending", "running"), str(job)
        details = job["job_details"]["current_job_details"]
        return details if details.get("message") == "Webserver ready." else None

    return job_id, await eventually(ready, timeout=120, interval=0.5)


@pytest.mark.slow
async def test_jupyter_lab_session_and_passthrough(
    client, auth, server_url, api_client_key, app
) -> None:
    job_id, details = await start_lab(client, auth)
    proxy = details["proxy_details"]
    connection = details["connection_details"]
    # passthrough_domain unset: the session opens where this client reached the API.
    assert connection["url_domain"] == server_url
    url = urlsplit(connection["url_path"])
    assert url.path == f"/passthrough/{proxy['hostname']}/{job_id}/lab"
    query = parse_qs(url.query)
    token = query["token"][0]
    assert query["uws_ticket"][0].startswith("t1.")
    # The upstream is the resource's choice: the session's Unix socket, owned by the
    # user's own OS account (never root, nor the server's); no TCP port at all.
    assert set(proxy) == {"hostname", "path", "socket", "uid"}
    assert proxy["path"] == f"/passthrough/{proxy['hostname']}/{job_id}/"
    info = os.lstat(proxy["socket"])
    assert stat.S_ISSOCK(info.st_mode) and info.st_uid == proxy["uid"] not in (0, os.geteuid())
    assert stat.S_IMODE(info.st_mode) == 0o600
    direct = f"http://localhost{proxy['path']}"

    def on_socket() -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=proxy["socket"]))

    async with on_socket() as session:
        r = await session.get(direct + "api/contents/", params={"token": token})
        assert r.status_code == 200
        assert "hello.py" in {item["name"] for item in r.json()["content"]}
    async with on_socket() as stranger:  # no token, no cookie from the above
        assert (await stranger.get(direct + "api/contents/")).status_code == 403

    base = f"{server_url}{proxy['path']}"
    # An API client passes with its header; the header never reaches the session.
    r = await client.get(base + "api/status", params={"token": token}, headers=auth)
    assert r.status_code == 200, r.text
    # A browser: the ticketed link sets a cookie scoped to the session and redirects.
    async with httpx.AsyncClient(base_url=server_url) as browser:
        r = await browser.get(connection["url_path"])
        assert r.status_code == 302
        assert "uws_ticket" not in r.headers["location"]
        assert "HttpOnly" in r.headers["set-cookie"]
        assert f"Path={proxy['path']}" in r.headers["set-cookie"]
        r = await browser.get(r.headers["location"], follow_redirects=True)
        assert r.status_code == 200 and "JupyterLab" in r.text
        # The cookie now opens the session's API, no header needed.
        r = await browser.get(f"{proxy['path']}api/contents/", params={"token": token})
        assert r.status_code == 200
    async with httpx.AsyncClient(base_url=server_url) as thief:
        r = await thief.get(connection["url_path"])  # the same link, already used
        assert r.status_code == 403
        r = await thief.get(f"{proxy['path']}api/status")  # no credentials at all
        assert r.status_code == 401
    other = {"UWS-Authorization": f"Token {await make_user_token(client, api_client_key)}"}
    r = await client.get(base + "api/status", headers=other)
    assert r.status_code == 404
    r = await client.get(f"/passthrough/10.0.0.1/{job_id}/api/status", headers=auth)
    assert r.status_code == 403  # not the host it registered: never connected to

    # The passthrough's traffic is the session's liveness, recorded on the job.
    await app.app.state.uws.activity.flush()
    row = await sql.fetchrow("SELECT (job_details->'metrics'->>'last_activity')::float8 AS s "
                             "FROM uws_job WHERE id = $1", job_id)
    assert row["s"] is not None and abs(time.time() - row["s"]) < 60

    r = await client.put(f"/jobs/{job_id}/stop/", headers=auth)
    assert r.status_code == 200
    done = await wait_status(client, auth, job_id, "complete", "failed", timeout=60)
    assert done["status"] == "complete"
    r = await client.get(base + "api/status", headers=auth)
    assert r.status_code == 403
    assert not os.path.exists(proxy["socket"])  # the session's directory went with it
    async with on_socket() as session:
        with pytest.raises(httpx.ConnectError):
            await session.get(direct + "api/status", params={"token": token})
