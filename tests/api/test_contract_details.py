"""Details of the wire contract existing clients depend on: empty bodies, the sections of
``GET /status/``, and session links that work on whatever address the server is reached."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import websockets

from controllers.base import Health
from core.config import load_config
from db import jobs as job_rows
from tests.api.test_jobs import wait_status
from tests.api.test_live_status import ws_url
from tests.api.test_workspaces import create

JSON = {"Content-Type": "application/json"}


def parser_message(raw: bytes) -> str:
    """What the reference answers: Python's own JSONDecodeError text."""
    try:
        json.loads(raw)
    except json.JSONDecodeError as exc:
        return f"Invalid JSON: {exc}"
    raise AssertionError(f"{raw!r} parses")


# --- 1. an empty or unparseable body ---------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"  \n", b"{", b"{'name': 'x'}", b"nul"])
async def test_empty_or_unparseable_body_is_invalid_json(client, auth, raw: bytes) -> None:
    ws = await create(client, auth, default_job_type="local_test_job")
    expected = {"success": False, "message": parser_message(raw)}
    for method, path in (("POST", "/workspaces/"), ("PUT", f"/workspaces/{ws['id']}/"),
                         ("PUT", f"/workspaces/{ws['id']}/start/"),
                         ("POST", "/shared_workspaces/")):
        for headers in ({**auth, **JSON}, auth):  # with and without a Content-Type
            r = await client.request(method, path, headers=headers, content=raw)
            assert (r.status_code, r.json()) == (400, expected), (method, path, headers)
    # Nothing was created or started by any of them.
    r = await client.get("/jobs/", headers=auth, params={"workspace_id": ws["id"]})
    assert r.json()["data"]["jobs"] == []


async def test_the_empty_body_message_is_the_references(client, auth) -> None:
    r = await client.post("/workspaces/", headers=auth)
    assert (r.status_code, r.json()) == (400, {
        "success": False, "message": "Invalid JSON: Expecting value: line 1 column 1 (char 0)"})


async def test_parseable_bodies_keep_their_messages(client, auth) -> None:
    ws = await create(client, auth)
    for method, path, body, message in (
        ("POST", "/workspaces/", {}, "Missing required fields."),
        ("PUT", f"/workspaces/{ws['id']}/", {}, "Missing required fields."),
        ("PUT", f"/workspaces/{ws['id']}/start/", {},
         "Missing job_type and no default job type set on workspace."),
        ("POST", "/shared_workspaces/", {"shared_user_ids": []}, "Missing required fields."),
    ):
        r = await client.request(method, path, headers=auth, json=body)
        assert (r.status_code, r.json()["message"]) == (400, message), path


# --- 2. GET /status/ in the reference's sections ---------------------------------------

SECTIONS = ("resources", "storage_methods", "user_authentication_methods")


def assert_health(value: Any) -> None:
    assert isinstance(value, dict) and set(value) == {"connected", "message"}, value
    assert isinstance(value["connected"], bool) and isinstance(value["message"], str), value


async def test_status_has_the_reference_sections(client) -> None:
    r = await client.get("/status/")
    assert r.status_code == 200
    body = r.json()
    assert {k: body[k] for k in ("success", "message")} == {"success": True, "message": ""}
    deps = body["dependencies"]
    assert set(deps) == {"main_resource", "api_user_authentication", *SECTIONS,
                         "job_types", "database", "temporal"}
    for single in ("main_resource", "api_user_authentication", "database", "temporal"):
        assert_health(deps[single])
        assert deps[single]["connected"] is True, (single, deps[single])
    # By the names config.toml gives them.
    assert list(deps["resources"]) == ["local_resource"]
    assert list(deps["storage_methods"]) == ["local_storage"]
    assert list(deps["user_authentication_methods"]) == ["local_auth"]
    assert set(deps["job_types"]) == {"jupyter_lab", "local_test_job"}
    for section in (*SECTIONS, "job_types"):
        for health in deps[section].values():
            assert_health(health)
            assert health["connected"] is True, (section, deps[section])


async def test_status_reports_a_failing_plugin(client, controllers, monkeypatch) -> None:
    resource = controllers.resources["local_resource"]
    storage = controllers.storage["local_storage"]

    async def unhealthy() -> Health:
        return Health(ok=False, detail="slurmrestd unreachable")

    async def broken() -> Health:
        raise OSError("disk gone")

    monkeypatch.setattr(resource, "health", unhealthy)
    monkeypatch.setattr(storage, "health", broken)
    deps = (await client.get("/status/")).json()["dependencies"]
    down = {"connected": False, "message": "slurmrestd unreachable"}
    assert deps["main_resource"] == deps["resources"]["local_resource"] == down
    assert deps["storage_methods"]["local_storage"] == {"connected": False,
                                                        "message": "disk gone"}
    assert deps["api_user_authentication"]["connected"] is True  # the others still checked
    assert deps["database"]["connected"] and deps["temporal"]["connected"]


# --- 3. connection_details.url_domain --------------------------------------------------


async def test_the_shipped_configurations_leave_passthrough_domain_unset(controllers) -> None:
    # What a job type writes as url_domain when nothing is configured: the API fills it.
    assert controllers.resources["local_resource"].passthrough_domain == ""
    shipped = load_config(Path(__file__).parents[2] / "config.toml")
    assert shipped.available_resources["local_resource"].passthrough_domain == ""


async def running_job(client, auth) -> int:
    ws = await create(client, auth)
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=auth,
                         json={"job_type": "local_test_job",
                               "job_details": {"duration_seconds": 120}})
    job_id = r.json()["data"]["job"]["id"]
    await wait_status(client, auth, job_id, "running")
    return job_id


async def set_connection(job_id: int, url_domain: str, url_path: str) -> None:
    """What the worker records when a session is up (written as its activity does)."""
    assert await job_rows.record_status(job_id, "running", current_job_details={
        "message": "Webserver ready.",
        "connection_details": {"url_domain": url_domain, "url_path": url_path}})


async def connection_of(client, headers: dict[str, str], job_id: int) -> dict[str, Any]:
    r = await client.get(f"/jobs/{job_id}/", headers=headers)
    return r.json()["data"]["jobs"][0]["job_details"]["current_job_details"][
        "connection_details"]


async def next_connection(sock, url_path: str) -> dict[str, Any]:
    """The first event showing the session at ``url_path`` (the worker's own events, with
    the connection recorded before, may come in between)."""
    async with asyncio.timeout(30):
        while True:
            event = json.loads(await sock.recv())
            connection = event["current_job_details"].get("connection_details") or {}
            if connection.get("url_path") == url_path:
                return connection


async def test_unset_url_domain_is_the_address_the_client_used(
    client, auth, server_url, engine
) -> None:
    job_id = await running_job(client, auth)
    path = f"/passthrough/127.0.0.1/{job_id}/"
    try:
        await set_connection(job_id, "", path)
        connection = await connection_of(client, auth, job_id)
        assert connection["url_domain"] == server_url
        assert connection["url_path"].startswith(f"{path}?uws_ticket=")  # still the owner's
        r = await client.get("/jobs/", headers=auth, params={"status": "running"})
        (listed,) = [j for j in r.json()["data"]["jobs"] if j["id"] == job_id]
        assert listed["job_details"]["current_job_details"]["connection_details"][
            "url_domain"] == server_url
        # Behind a proxy: the address the browser used, as the proxy forwards it.
        proxied = {**auth, "Host": "uws.example.org", "X-Forwarded-Proto": "https"}
        assert (await connection_of(client, proxied, job_id))["url_domain"] == \
            "https://uws.example.org"
        # The job socket: its first message (the row) and a later change (a NOTIFY).
        async with websockets.connect(ws_url(server_url, f"/jobs/{job_id}/"),
                                      additional_headers=auth) as sock:
            first = await next_connection(sock, path)  # the row, as the socket opens
            assert first["url_domain"] == server_url  # ws:// reached: the http:// link
            await set_connection(job_id, "", f"{path}lab")
            changed = await next_connection(sock, f"{path}lab")  # a NOTIFY
            assert changed["url_domain"] == server_url
        # The row keeps it empty: a client on another address gets that address.
        other = {**auth, "Host": "uws-2.internal:8443"}
        assert (await connection_of(client, other, job_id))["url_domain"] == \
            "http://uws-2.internal:8443"
    finally:
        await client.put(f"/jobs/{job_id}/stop/", headers=auth)


async def test_a_configured_url_domain_is_used_as_given(
    client, auth, server_url, engine
) -> None:
    job_id = await running_job(client, auth)
    path = f"/passthrough/127.0.0.1/{job_id}/"
    try:
        await set_connection(job_id, "https://sessions.example.org", path)
        connection = await connection_of(client, auth, job_id)
        assert connection["url_domain"] == "https://sessions.example.org"
        async with websockets.connect(ws_url(server_url, f"/jobs/{job_id}/"),
                                      additional_headers=auth) as sock:
            assert (await next_connection(sock, path))["url_domain"] == \
                "https://sessions.example.org"
    finally:
        await client.put(f"/jobs/{job_id}/stop/", headers=auth)
