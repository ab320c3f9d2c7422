"""Shared-workspace mappings: reads for the API and the share activities."""

from __future__ import annotations

from typing import Any

from db import reads

_WS = ("{p}.id AS {p}_id, {p}.name AS {p}_name, {p}.description AS {p}_description, "
       "{p}.request_workspace_details AS {p}_request, {p}.current_workspace_details AS "
       "{p}_current, {p}.file_path AS {p}_path, {p}.storage_name AS {p}_storage, "
       "{p}.status AS {p}_status, {p}u.id AS {p}_user_id, {p}u.username AS {p}_username, "
       "{p}u.first_name AS {p}_first_name, {p}u.last_name AS {p}_last_name, "
       "{p}u.email AS {p}_email")

_SELECT = (
    "SELECT m.id, m.last_resource_options, m.last_job_type, m.is_accepted, "
    "m.datetime_share_created, " + _WS.format(p="o") + ", " + _WS.format(p="s") + " "
    "FROM uws_shared_workspace_mapping m "
    "JOIN uws_workspace o ON o.id = m.original_workspace "
    'JOIN uws_user ou ON ou.id = o."user" '
    "JOIN uws_workspace s ON s.id = m.shared_workspace "
    'JOIN uws_user su ON su.id = s."user" '
)


async def mappings(*, sender: int | None = None, recipient: int | None = None,
                   shared_workspace_id: int | None = None,
                   is_accepted: bool | None = None) -> list[Any]:
    clauses: list[str] = []
    args: list[Any] = []

    def add(sql: str, value: Any) -> None:
        args.append(value)
        clauses.append(sql.format(len(args)))

    if sender is not None:
        add('o."user" = ${}', sender)
    if recipient is not None:
        add('s."user" = ${}', recipient)
    if shared_workspace_id is not None:
        add("m.shared_workspace = ${}", shared_workspace_id)
    if is_accepted is not None:
        add("m.is_accepted = ${}", is_accepted)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    return await reads.fetch(f"{_SELECT}{where} ORDER BY m.id", *args)


async def one(shared_workspace_id: int) -> Any | None:
    rows = await mappings(shared_workspace_id=shared_workspace_id)
    return rows[0] if rows else None


async def newest_job(workspace_id: int) -> Any | None:
    return await reads.fetchrow(
        "SELECT job_type, resource_options FROM uws_job WHERE workspace = $1 "
        "ORDER BY datetime_created DESC, id DESC LIMIT 1", workspace_id)
