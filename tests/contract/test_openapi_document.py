"""The served ``/schema/openapi.json`` is a valid OpenAPI document that describes the wire
contract exactly: what the reference's hand-written description lists, with every path as
served, the sub-actions as operations, bodies, the envelope on every status, the header."""

from __future__ import annotations

import re
from typing import Any

from openapi_spec_validator import validate

# What the reference server's published description (uws-openapi-1.0.5.yaml) lists:
# (method, path) -> (its query parameters, its request body's media type).
REFERENCE: dict[tuple[str, str], tuple[tuple[str, ...], str | None]] = {
    ("get", "/workspaces/"): (("name", "description", "status"), None),
    ("post", "/workspaces/"): ((), "application/json"),
    ("get", "/workspaces/{workspace_id}/"): ((), None),
    ("put", "/workspaces/{workspace_id}/"): ((), "application/json"),
    ("delete", "/workspaces/{workspace_id}/"): ((), None),
    ("put", "/workspaces/{workspace_id}/upload/"): ((), "multipart/form-data"),
    ("put", "/workspaces/{workspace_id}/start/"): ((), "application/json"),
    ("get", "/jobs/"): (("workspace_id", "resource_job_id", "job_type", "status"), None),
    ("get", "/jobs/{job_id}/"): ((), None),
    ("put", "/jobs/{job_id}/stop/"): ((), None),
    ("get", "/job_types/"): ((), None),
    ("get", "/parameters/"): ((), None),
}
METHODS = ("get", "put", "post", "delete", "patch")

# (method, path) -> operationId: what generated clients are named after; keep them stable.
OPERATIONS = {
    ("post", "/tokens/"): "createUserToken",
    ("get", "/workspaces/"): "listWorkspaces",
    ("post", "/workspaces/"): "createWorkspace",
    ("get", "/workspaces/{workspace_id}/"): "getWorkspace",
    ("put", "/workspaces/{workspace_id}/"): "updateWorkspace",
    ("delete", "/workspaces/{workspace_id}/"): "deleteWorkspace",
    ("put", "/workspaces/{workspace_id}/upload/"): "uploadToWorkspace",
    ("put", "/workspaces/{workspace_id}/start/"): "startWorkspaceJob",
    ("get", "/jobs/"): "listJobs",
    ("get", "/jobs/{job_id}/"): "getJob",
    ("get", "/jobs/{job_id}/events/"): "getJobEvents",
    ("put", "/jobs/{job_id}/stop/"): "stopJob",
    ("put", "/jobs/{job_id}/extend/"): "extendJob",
    ("get", "/job_types/"): "listJobTypes",
    ("get", "/parameters/"): "listParameters",
    ("get", "/status/"): "getStatus",
    ("get", "/users/"): "searchUsers",
    ("get", "/users/me/quota/"): "getMyQuota",
    ("get", "/shared_workspaces/"): "listSharedWorkspaces",
    ("post", "/shared_workspaces/"): "shareWorkspace",
    ("get", "/shared_workspaces/{shared_workspace_id}/"): "getSharedWorkspace",
    ("put", "/shared_workspaces/{shared_workspace_id}/accept/"): "acceptSharedWorkspace",
    ("delete", "/shared_workspaces/{shared_workspace_id}/"): "deleteShare",
}
PUBLIC = {"createUserToken", "listJobTypes", "listParameters", "getStatus"}
ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


def operations(schema: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m, path): op for path, item in schema["paths"].items()
            for m, op in item.items() if m in METHODS}


def test_the_validator_accepts_it(served_schema) -> None:
    validate(served_schema)


def test_every_operation_with_its_path_as_served_and_a_stable_id(served_schema) -> None:
    ops = operations(served_schema)
    assert {key: op["operationId"] for key, op in ops.items()} == OPERATIONS
    assert all(path.endswith("/") for path in served_schema["paths"])
    assert not any("put_type" in path for path in served_schema["paths"])


def test_it_covers_the_reference_description(served_schema) -> None:
    ours = operations(served_schema)
    for (method, path), (query, media) in REFERENCE.items():
        op = ours.get((method, path))
        assert op is not None, (method, path)
        our_query = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        assert set(query) <= our_query, (method, path, set(query) - our_query)
        body = op.get("requestBody", {}).get("content", {})
        assert list(body) == ([media] if media else []), (method, path)
        assert "200" in op["responses"], (method, path)


def test_bodies_statuses_and_security(served_schema) -> None:
    schemes = served_schema["components"]["securitySchemes"]
    (name, scheme), = schemes.items()
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header",
                                                             "UWS-Authorization")
    components = served_schema["components"]["schemas"]
    for (method, path), op in operations(served_schema).items():
        label = (method, path)
        assert op.get("security") == (None if op["operationId"] in PUBLIC else [{name: []}]), \
            label
        responses = op["responses"]
        assert "401" in responses and "503" in responses, label
        for code, response in responses.items():
            schema = response["content"]["application/json"]["schema"]
            if code.startswith(("4", "5")):
                assert schema == ERROR, label
            else:
                assert code == "200", label
                ok = components[schema["$ref"].rsplit("/", 1)[1]]
                assert {"success", "message"} <= set(ok["required"]), label
        if method in ("post", "put") and not path.endswith("/stop/") \
                and not path.endswith("/accept/"):
            body = op["requestBody"]
            assert body["required"] is True and "413" in responses, label
            (media, content), = body["content"].items()
            if media == "application/json":
                model = content["schema"]["$ref"].rsplit("/", 1)[1]
                assert components[model]["type"] == "object", label
                assert content.get("examples"), label
            else:
                assert media == "multipart/form-data" and path.endswith("/upload/"), label
                files = content["schema"]["properties"]["files"]
                assert files["items"] == {"type": "string", "format": "binary"}
        else:
            assert "requestBody" not in op, label
    envelope = components["ErrorResponse"]
    assert envelope["properties"]["success"]["const"] is False
    assert set(envelope["required"]) == {"success", "message"}


def test_resource_options_come_from_the_configured_parameters(served_schema, client) -> None:
    options = served_schema["components"]["schemas"]["ResourceOptions"]["properties"]
    assert options["num_cpus"]["type"] == "integer"
    assert (options["num_cpus"]["minimum"], options["num_cpus"]["maximum"]) == (1, 4)
    assert options["gpu_enabled"]["type"] == "boolean"
    start = served_schema["paths"]["/workspaces/{workspace_id}/start/"]["put"]
    body = start["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobStart"}


def test_the_websockets_are_described_in_the_text(served_schema) -> None:
    text = served_schema["info"]["description"]
    for socket in ("ws /jobs/{job_id}/", "ws /jobs/", "/passthrough/"):
        assert socket in text
    assert "4401" in text and "4404" in text and "?token=" in text


async def test_every_described_path_is_served_there(served_schema, client, auth) -> None:
    """With its slash the path is the operation's; a GET without it is the contract's 301."""
    for (method, path), op in operations(served_schema).items():
        url = re.sub(r"{\w+}", "999999999", path)
        headers = auth if op.get("security") else {}
        r = await client.request(method.upper(), url, headers=headers)
        assert r.status_code in {int(code) for code in op["responses"]}, \
            (method, url, r.status_code, r.text)
        if method == "get":
            r = await client.get(url.rstrip("/"), headers=headers)
            assert (r.status_code, r.headers["location"]) == (301, url), url


async def test_the_yaml_and_the_swagger_ui_serve_the_same_document(served_schema, client) -> None:
    import yaml

    r = await client.get("/schema/openapi.yaml")
    assert r.status_code == 200
    assert yaml.safe_load(r.text)["paths"].keys() == served_schema["paths"].keys()
    r = await client.get("/schema/swagger")
    assert r.status_code == 200 and "/workspaces/{workspace_id}/start/" in r.text


def test_the_documented_statuses_are_the_codes() -> None:
    """The document lists each status (literals, for clients); the code uses enums."""
    from typing import get_args

    from api import schemas
    from core import status

    assert get_args(schemas.JobStatus) == tuple(status.JobStatus)
    assert get_args(schemas.WorkspaceStatus) == tuple(status.WorkspaceStatus)
