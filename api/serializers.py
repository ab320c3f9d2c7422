"""Rows to the contract's JSON shapes (field names and order as clients expect)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar.connection import ASGIConnection

from db.sql import as_json


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def raw_json(value: Any) -> Any:
    """A JSONB value as stored: text from asyncpg goes out as is (no parse and re-encode),
    anything else (Piccolo gives dicts when asked) is encoded as usual."""
    if isinstance(value, str):
        return msgspec.Raw(value.encode())
    return value if value is not None else {}


def _columns(row: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: row[name] for name in names}


def _times(row: Any, names: tuple[str, ...]) -> dict[str, str | None]:
    return {name: iso(row[name]) for name in names}


def workspace_json(row: Any) -> dict[str, Any]:
    return {
        **_columns(row, ("id", "name", "description", "disk_space")),
        **_times(row, ("datetime_created", "datetime_last_modified",
                       "datetime_last_job_launch")),
        "workspace_details": {
            "request_workspace_details": raw_json(row["request_workspace_details"]),
            "current_workspace_details": raw_json(row["current_workspace_details"]),
        },
        "status": row["status"],
        "default_job_type": row["default_job_type"],
    }


def origin_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """``scheme://host[:port][/root path]`` the client reached this API at (a WebSocket's
    ``ws``/``wss`` as the ``http``/``https`` a browser opens a session link with)."""
    base = connection.base_url
    scheme = {"ws": "http", "wss": "https"}.get(base.scheme, base.scheme)
    return f"{scheme}://{base.netloc}{base.path.rstrip('/')}"


def with_url_domain(current: Any, origin: str | None) -> Any:
    """``current_job_details`` whose ``connection_details.url_domain`` is empty (the
    resource's ``passthrough_domain`` unset) given ``origin``: the worker that wrote it
    cannot know the address the client uses, the API answering that client does."""
    if not origin or not isinstance(current, dict):
        return current
    connection = current.get("connection_details")
    if not isinstance(connection, dict) or connection.get("url_domain"):
        return current
    return {**current, "connection_details": {**connection, "url_domain": origin}}


def job_json(row: dict[str, Any], origin: str | None = None) -> dict[str, Any]:
    """A job row as the contract's job; ``origin`` (see :func:`origin_of`) fills an unset
    session ``url_domain``."""
    details = as_json(row["job_details"])
    if isinstance(details, dict) and "current_job_details" in details:
        details = {**details, "current_job_details":
                   with_url_domain(details["current_job_details"], origin)}
    return {
        "id": row["id"],
        "workspace_id": row["workspace"],
        **_columns(row, ("resource_job_id", "job_type", "status")),
        **_times(row, ("datetime_created", "datetime_start", "datetime_end")),
        "core_hours": row["core_hours"],
        "job_details": details,
    }


def user_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "first_name": row["first_name"],
        "last_name": row["last_name"],
        "username": row["username"],
        "email": row["email"],
    }
