"""Shared-workspace mappings: reads for the API and the share activities, and the
changes that race each other (create, accept, withdraw), each under a row lock."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from core.status import UNUSABLE_WORKSPACE_STATUSES, WorkspaceStatus
from db import quotas, sql, workspaces
from db.accounts import API_CLIENTS_GROUP

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

    def add(clause: str, value: Any) -> None:
        args.append(value)
        clauses.append(clause.format(len(args)))

    if sender is not None:
        add('o."user" = ${}', sender)
    if recipient is not None:
        add('s."user" = ${}', recipient)
    if shared_workspace_id is not None:
        add("m.shared_workspace = ${}", shared_workspace_id)
    if is_accepted is not None:
        add("m.is_accepted = ${}", is_accepted)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    return await sql.fetch(f"{_SELECT}{where} ORDER BY m.id", *args)


async def one(shared_workspace_id: int) -> Any | None:
    rows = await mappings(shared_workspace_id=shared_workspace_id)
    return rows[0] if rows else None


async def newest_job(workspace_id: int) -> Any | None:
    return await sql.fetchrow(
        "SELECT job_type, resource_options FROM uws_job WHERE workspace = $1 "
        "ORDER BY datetime_created DESC, id DESC LIMIT 1", workspace_id)


class ShareRefused(Exception):
    """A share the sender may not make now; the message is the client's 400."""


# Pending: not accepted and not on its way out (a withdrawn copy being removed).
_PENDING_SQL = (
    "SELECT count(*) FROM uws_shared_workspace_mapping m "
    "JOIN uws_workspace o ON o.id = m.original_workspace "
    "JOIN uws_workspace c ON c.id = m.shared_workspace "
    f"WHERE o.\"user\" = $1 AND NOT m.is_accepted AND c.status <> '{WorkspaceStatus.deleting}'")


async def pending_count(sender_id: int) -> int:
    return int(await sql.fetchval(_PENDING_SQL, sender_id))


@dataclass
class NewCopy:
    recipient_id: int
    path_of: Callable[[int], str]  # the copy's directory, given its id (fixed once, here)


async def create(sender_id: int, original_id: int, copies: list[NewCopy],
                 max_pending: int, last_job: Any | None) -> list[int]:
    """Insert a copy (``initializing``) and its mapping per recipient, all or none; the
    ids of the copies. Under the sender's row lock (their pending count and disk quota
    are decided there) and the original's (no deletion slips in); ``ShareRefused``."""
    async with sql.transaction() as conn:
        await quotas.lock_user(conn, sender_id)
        original = await workspaces.lock(conn, original_id)
        if original is None or original["user"] != sender_id:
            raise ShareRefused(f"Workspace {original_id} is deleting and cannot be shared.")
        if original["status"] in UNUSABLE_WORKSPACE_STATUSES:
            raise ShareRefused(f"Workspace {original_id} is {original['status']} and cannot "
                               "be shared.")
        pending = int(await conn.fetchval(_PENDING_SQL, sender_id))
        if pending + len(copies) > max_pending:
            raise ShareRefused(
                f"Too many pending shares: {pending} of your shares are not accepted yet and "
                f"at most {max_pending} may be pending at once, so {len(copies)} more cannot "
                "be added. Cancel some or wait until they are accepted.")
        # Until accepted, every copy is charged to the sender, at its original's size.
        size = original["disk_space"] + await quotas.claimed_on(conn, original_id)
        n = len(copies)
        what = "this copy needs" if n == 1 else f"these {n} copies need"
        try:
            await quotas.check_disk_room(conn, sender_id, size * n, what)
        except quotas.QuotaExceeded as exc:
            raise ShareRefused(str(exc)) from None
        created: list[int] = []
        for copy in copies:
            copy_id = await conn.fetchval(
                'INSERT INTO uws_workspace ("user", name, description, storage_name, '
                "default_job_type, request_workspace_details, current_workspace_details, "
                "status) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8) RETURNING id",
                copy.recipient_id, original["name"], original["description"],
                original["storage_name"], original["default_job_type"],
                json.dumps(sql.as_json(original["request_workspace_details"])),
                json.dumps({"files": [], "symlinks": []}), WorkspaceStatus.initializing)
            await conn.execute("UPDATE uws_workspace SET file_path = $2 WHERE id = $1",
                               copy_id, copy.path_of(copy_id))
            await conn.execute(
                "INSERT INTO uws_shared_workspace_mapping (original_workspace, "
                "shared_workspace, last_resource_options, last_job_type) "
                "VALUES ($1, $2, $3::jsonb, $4)", original_id, copy_id,
                json.dumps(sql.as_json(last_job["resource_options"]) if last_job else {}),
                last_job["job_type"] if last_job else None)
            created.append(copy_id)
    return created


async def _lock_mapping(conn: Any, shared_workspace_id: int) -> Any | None:
    """Lock the share's mapping row; then its state, read by a statement of its own: one
    joined to the lock would show the copy as it was before the wait."""
    if await conn.fetchval(
        "SELECT id FROM uws_shared_workspace_mapping WHERE shared_workspace = $1 "
        "FOR NO KEY UPDATE", shared_workspace_id
    ) is None:
        return None
    return await conn.fetchrow(
        "SELECT m.is_accepted, c.status, c.\"user\" AS recipient "
        "FROM uws_shared_workspace_mapping m JOIN uws_workspace c ON c.id = m.shared_workspace "
        "WHERE m.shared_workspace = $1", shared_workspace_id)


async def accept(shared_workspace_id: int, recipient_id: int) -> bool:
    """Accept a share (again: a no-op); ``False`` when it is not the recipient's or is
    being withdrawn. The mapping's row lock orders it against a concurrent withdrawal."""
    async with sql.transaction() as conn:
        row = await _lock_mapping(conn, shared_workspace_id)
        if row is None or row["recipient"] != recipient_id:
            return False
        if row["is_accepted"]:
            return True
        if row["status"] == WorkspaceStatus.deleting:
            return False
        await conn.execute("UPDATE uws_shared_workspace_mapping SET is_accepted = true "
                           "WHERE shared_workspace = $1", shared_workspace_id)
        # Its writes in progress, if any, are the recipient's from now on, as is the copy.
        await conn.execute('UPDATE uws_disk_reservation SET "user" = $2 WHERE workspace = $1',
                           shared_workspace_id, recipient_id)
    return True


class Withdrawal(Enum):
    queued = "queued"
    missing = "missing"
    accepted = "accepted"


async def withdraw(shared_workspace_id: int) -> Withdrawal:
    """Mark the copy of a share not yet accepted ``deleting`` (under the mapping's lock,
    so an acceptance at the same moment either wins or sees this)."""
    async with sql.transaction() as conn:
        row = await _lock_mapping(conn, shared_workspace_id)
        if row is None:
            return Withdrawal.missing
        if row["is_accepted"]:
            return Withdrawal.accepted
        await conn.execute(
            "UPDATE uws_workspace SET status = $2, status_reason = 'Share withdrawn.' "
            "WHERE id = $1", shared_workspace_id, WorkspaceStatus.deleting)
    return Withdrawal.queued


async def discard(copy_ids: list[int]) -> None:
    """Remove copies whose workflow never started (nothing was written for them yet)."""
    if copy_ids:
        await sql.execute("DELETE FROM uws_workspace WHERE id = ANY($1)", copy_ids)


async def recipients(user_ids: list[int]) -> list[Any]:
    """Users by id, with what decides whether they can receive a share."""
    return await sql.fetch(
        "SELECT u.id, u.username, u.email, u.first_name, u.last_name, u.is_active, "
        "EXISTS (SELECT 1 FROM uws_group_membership g WHERE g.\"user\" = u.id "
        "AND g.group_name = $2) AS is_api_client FROM uws_user u WHERE u.id = ANY($1)",
        user_ids, API_CLIENTS_GROUP)
