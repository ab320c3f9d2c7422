"""The app's generated OpenAPI description, completed with what the handlers cannot declare.

Handlers read their JSON bodies themselves (so the contract's own messages answer bad
input), so Litestar knows neither the request bodies nor the error answers. This overlay
adds them from API-CONTRACT.md: request bodies (loosely typed, nothing required, so the
fuzzer also reaches the "missing field" answers), the envelope on every error status the
contract names, and the trailing slash of every contract path. The 200 bodies stay as the
app generates them: those are what the fuzzer checks against our declared types.
"""

from __future__ import annotations

import copy
from typing import Any

ENVELOPE: dict[str, Any] = {
    "type": "object",
    "required": ["success", "message"],
    "properties": {"success": {"const": False}, "message": {"type": "string"}},
}

# Every endpoint: auth (401), unknown method (405), bad input (400), body limit (413),
# database/Temporal down (503). The rest per endpoint, from the contract.
_COMMON = (400, 401, 405, 413, 503)
_EXTRA: dict[tuple[str, str], tuple[int, ...]] = {
    ("put", "/workspaces/{workspace_id}/{put_type}/"): (404, 422, 500),
    ("put", "/workspaces/{workspace_id}/"): (404,),
    ("delete", "/workspaces/{workspace_id}/"): (404,),
    ("put", "/workspaces/{workspace_id}/upload/"): (404,),
    ("post", "/workspaces/"): (500,),
    ("put", "/jobs/{job_id}/{put_type}/"): (404,),
    ("get", "/jobs/{job_id}/events/"): (404,),
    ("post", "/shared_workspaces/"): (404,),
    ("put", "/shared_workspaces/{shared_workspace_id}/{put_type}/"): (404,),
    ("delete", "/shared_workspaces/{shared_workspace_id}/"): (403, 404),
}

_ANY_JSON: dict[str, Any] = {}
_FILE = {"type": "object", "properties": {"name": {"type": "string"},
                                          "content": {"type": "string"}}}
_SYMLINK = {"type": "object", "properties": {"name": {"type": "string"},
                                             "source_path": {"type": "string"}}}
_DETAILS = {"type": "object", "properties": {"files": {"type": "array", "items": _FILE},
                                             "symlinks": {"type": "array", "items": _SYMLINK}}}
_WORKSPACE = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "description": {"type": "string", "maxLength": 40},
    "default_job_type": {"type": "string"},
    "workspace_details": _DETAILS,
}}
_OPTIONS = {"type": "object", "properties": {
    "num_cpus": _ANY_JSON, "memory_mb": _ANY_JSON, "time_limit_min": _ANY_JSON,
    "gpu_enabled": _ANY_JSON,
}}
_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/tokens/"): {"type": "object", "properties": {
        "client_token": {"type": "string"},
        "user_info": {"type": "object", "properties": {
            "username": {"type": "string"}, "email": {"type": "string"}}},
    }},
    ("post", "/workspaces/"): _WORKSPACE,
    ("put", "/workspaces/{workspace_id}/"): _WORKSPACE,
    ("put", "/workspaces/{workspace_id}/{put_type}/"): {"type": "object", "properties": {
        # The short test job (a JupyterLab would outlive the test); invalid ones come
        # from the negative mode.
        "job_type": {"enum": ["local_test_job", ""]}, "job_details": _ANY_JSON,
        "resource_options": _OPTIONS,
    }, "required": ["resource_options"]},  # so that option validation is reached
    ("put", "/jobs/{job_id}/{put_type}/"): {"type": "object", "properties": {
        "minutes": _ANY_JSON}},
    ("post", "/shared_workspaces/"): {"type": "object", "properties": {
        "original_workspace_id": _ANY_JSON, "shared_user_ids": _ANY_JSON}},
}
# Filters the list handlers read from the query string themselves.
_FILTERS: dict[str, tuple[str, ...]] = {
    "/workspaces/": ("name", "description", "status"),
    "/workspaces/{workspace_id}/": ("name", "description", "status"),
    "/jobs/": ("workspace_id", "resource_job_id", "job_type", "status"),
    "/jobs/{job_id}/": ("workspace_id", "resource_job_id", "job_type", "status"),
    "/shared_workspaces/": ("is_accepted",),
    "/shared_workspaces/{shared_workspace_id}/": ("is_accepted",),
}
_UPLOAD = {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}


def _error() -> dict[str, Any]:
    return {"description": "The contract's error envelope.",
            "content": {"application/json": {"schema": ENVELOPE}}}


def with_contract(generated: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``generated`` with slashed paths, request bodies and error envelopes."""
    schema = copy.deepcopy(generated)
    paths: dict[str, Any] = {}
    for path, item in schema["paths"].items():
        slashed = path if path.endswith("/") else path + "/"
        paths[slashed] = item
        for method, operation in item.items():
            if method not in ("get", "put", "post", "delete", "patch"):
                continue
            responses = operation.setdefault("responses", {})
            for code in (*_COMMON, *_EXTRA.get((method, slashed), ())):
                responses[str(code)] = _error()
            if method == "get":
                operation.setdefault("parameters", []).extend(
                    {"name": name, "in": "query", "required": False,
                     "schema": {"type": "string"}} for name in _FILTERS.get(slashed, ()))
            body = _BODIES.get((method, slashed))
            if body is not None:
                operation["requestBody"] = {
                    "required": "required" in body,
                    "content": {"application/json": {"schema": body}}}
            elif slashed.endswith("/upload/"):
                operation["requestBody"] = {
                    "required": True, "content": {"multipart/form-data": {"schema": _UPLOAD}}}
    schema["paths"] = paths
    return schema
