"""Public catalogue endpoints and ``GET /users/``."""

from __future__ import annotations

import secrets

from tests.conftest import make_user_token


async def test_job_types(client) -> None:
    r = await client.get("/job_types/")
    assert r.status_code == 200
    assert r.json() == {"success": True, "message": "Successful.", "data": {"job_types": {
        "jupyter_lab": {"id": "jupyter_lab", "name": "Jupyter Lab"},
        "local_test_job": {"id": "local_test_job", "name": "Local Test Job"},
    }}}


async def test_parameters_exactly_as_configured(client) -> None:
    r = await client.get("/parameters/")
    params = r.json()["data"]["parameters"]
    assert params[0] == {"display_name": "Number of CPUs", "description": "",
                         "variable_name": "num_cpus", "default_value": 1,
                         "validation": {"type": "int", "min": 1, "max": 4, "required": False}}
    assert params[3]["validation"] == {"type": "bool", "required": False}
    assert params[3]["default_value"] is False


async def test_status_reports_every_dependency(client) -> None:
    r = await client.get("/status/")
    body = r.json()
    assert body["success"] is True and body["message"] == ""
    assert body["version"] and body["build"]
    deps = body["dependencies"]
    assert deps["database"]["connected"] and deps["temporal"]["connected"]
    assert set(deps["resources"]) == {"local_resource"}
    assert set(deps["storage_methods"]) == {"local_storage"}
    assert set(deps["user_authentication_methods"]) == {"local_auth"}
    assert {"jupyter_lab", "local_test_job"} <= set(deps["job_types"])
    healths = [deps["main_resource"], deps["api_user_authentication"], deps["database"],
               deps["temporal"]]
    for section in ("resources", "storage_methods", "user_authentication_methods",
                    "job_types"):
        healths.extend(deps[section].values())
    assert all(h["connected"] for h in healths), deps


async def test_user_search(client, api_client_key) -> None:
    tag = secrets.token_hex(3)
    me = await make_user_token(client, api_client_key, f"me{tag}")
    await make_user_token(client, api_client_key, f"carol{tag}")
    auth = {"UWS-Authorization": f"Token {me}"}
    r = await client.get("/users/", headers=auth, params={"search": f"CAROL{tag}"})
    users = r.json()["data"]["users"]
    assert [u["username"] for u in users] == [f"carol{tag}"]
    assert set(users[0]) == {"id", "first_name", "last_name", "username", "email"}
    r = await client.get("/users/", headers=auth, params={"search": f"Carol{tag} tester"})
    assert len(r.json()["data"]["users"]) == 1  # first + last name
    r = await client.get("/users/", headers=auth, params={"search": f"me{tag}"})
    assert r.json() == {"success": True,
                        "message": "Users matching given parameters could not be found.",
                        "data": {"users": []}}
    r = await client.get("/users/", headers=auth, params={"search": "%"})
    assert all("%" in u["email"] + u["first_name"] + u["last_name"]
               for u in r.json()["data"]["users"])


async def test_openapi_documents_every_route(client) -> None:
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in ("/tokens/", "/workspaces/", "/workspaces/{workspace_id}/",
                 "/workspaces/{workspace_id}/upload/", "/jobs/", "/jobs/{job_id}/",
                 "/job_types/", "/parameters/", "/status/", "/users/"):
        assert any(p.rstrip("/") == path.rstrip("/") for p in paths), path
