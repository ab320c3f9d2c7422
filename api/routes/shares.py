"""``/shared_workspaces/``: share a copy of a workspace; recipients accept or decline."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from litestar import Controller, Request, delete, get, post, put
from litestar.params import FromPath

from api import schemas, workflow_ops
from api.auth import AuthUser, current_user
from api.body import json_body
from api.errors import BadRequest, NotFound, PermissionDenied
from api.ids import parse_id
from api.openapi import contract, query
from api.serializers import iso, raw_json
from api.state import AppState, app_state
from core.status import UNUSABLE_WORKSPACE_STATUSES
from db import accounts, shares, workspaces

_TRUE = {"true", "1", "yes", "True"}
_FALSE = {"false", "0", "no", "False"}
_FILTER_DOCS = (query("is_accepted", "Only accepted (true) or pending (false) shares.",
                      enum=("true", "false")),)


def _small_workspace(row: Any, p: str) -> dict[str, Any]:
    return {
        "id": row[f"{p}_id"],
        "user_id": {"username": row[f"{p}_username"], "first_name": row[f"{p}_first_name"],
                    "last_name": row[f"{p}_last_name"], "email": row[f"{p}_email"]},
        "name": row[f"{p}_name"],
        "description": row[f"{p}_description"],
        "workspace_details": {"request_workspace_details": raw_json(row[f"{p}_request"]),
                              "current_workspace_details": raw_json(row[f"{p}_current"])},
    }


def mapping_json(row: Any) -> dict[str, Any]:
    return {
        "original_workspace_id": _small_workspace(row, "o"),
        "shared_workspace_id": _small_workspace(row, "s"),
        "last_resource_options": raw_json(row["last_resource_options"]),
        "last_job_type": row["last_job_type"] or "",  # the reference: "", never null
        "is_accepted": row["is_accepted"],
        "datetime_share_created": iso(row["datetime_share_created"]),
    }


def _not_found(raw_id: Any) -> NotFound:
    return NotFound(f"Shared workspace {raw_id} not found.")


async def _listing(request: Request[Any, Any, Any], shared_id: int | None) -> dict[str, Any]:
    user = current_user(request)
    flag = request.query_params.get("is_accepted")
    accepted = True if flag in _TRUE else False if flag in _FALSE else None
    sent = await shares.mappings(sender=user.id, shared_workspace_id=shared_id,
                                 is_accepted=accepted)
    received = await shares.mappings(recipient=user.id, shared_workspace_id=shared_id,
                                     is_accepted=accepted)
    found = bool(sent or received)
    return {
        "success": True,
        "message": "Successful." if found else
        "Shared workspace matching given parameters could not be found.",
        "data": {"original_workspaces": [mapping_json(r) for r in sent],
                 "shared_workspaces": [mapping_json(r) for r in received]},
    }


class SharedWorkspaceRoutes(Controller):
    """Copies of workspaces shared with others: make them, list both sides, accept,
    decline or withdraw one."""

    path = "/shared_workspaces"
    tags = ["shared workspaces"]

    @get("/", operation_id="listSharedWorkspaces",
         **contract("List shares sent and received",
                    schemas.ShareListResponse, 401, 503, filters=_FILTER_DOCS))
    async def list_shares(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Shares the caller sent (``original_workspaces``) and received
        (``shared_workspaces``), optionally filtered by ``is_accepted``."""
        return await _listing(request, None)

    @get("/{shared_workspace_id:str}/", operation_id="getSharedWorkspace",
         **contract("Get one share (as lists)",
                    schemas.ShareListResponse, 401, 503, filters=_FILTER_DOCS))
    async def get_share(
        self, request: Request[Any, Any, Any], shared_workspace_id: FromPath[str]
    ) -> dict[str, Any]:
        """One share, named by the id of the copy (the recipient's workspace)."""
        current_user(request)
        sid = parse_id(shared_workspace_id)
        return await _listing(request, sid if sid is not None else -1)

    @post("/", status_code=200, operation_id="shareWorkspace",
          **contract("Share a copy of a workspace",
                     schemas.SharesCreatedResponse, 400, 401, 404, 413, 503,
                     body=schemas.ShareCreate,
                     examples={"two colleagues": {"original_workspace_id": 3,
                                                  "shared_user_ids": [5, 6]}}))
    async def create_share(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Share a copy of one of the caller's workspaces with each of ``shared_user_ids``;
        the copies and the e-mail invitations are made in the background."""
        state, user = app_state(request), current_user(request)
        body = await json_body(request, empty_ok=False)
        if not isinstance(body, dict) or "original_workspace_id" not in body \
                or "shared_user_ids" not in body:
            raise BadRequest("Missing required fields.")
        raw_original = body["original_workspace_id"]
        original = await _own_workspace(user, raw_original)
        if original is None:
            raise NotFound(f"Workspace {raw_original} not found for user.")
        user_ids = body["shared_user_ids"]
        if not isinstance(user_ids, list):
            raise BadRequest("shared_user_ids is not a list.")
        recipients = await _recipients(user_ids, user)
        if original["status"] in UNUSABLE_WORKSPACE_STATUSES:
            raise BadRequest(f"Workspace {original['id']} is {original['status']} and cannot "
                             "be shared.")
        if not recipients:
            return {"success": True, "message": "Successful.",
                    "data": {"shared_workspaces": []}}
        created = await _share_with(state, user, original, recipients)
        rows = [await shares.one(shared_id) for shared_id in created]
        return {"success": True, "message": "Successful.",
                "data": {"shared_workspaces": [mapping_json(r) for r in rows if r]}}

    @put("/{shared_workspace_id:str}/accept/", operation_id="acceptSharedWorkspace",
         **contract("Accept a share", schemas.MessageResponse, 401, 404, 503))
    async def accept(
        self, request: Request[Any, Any, Any], shared_workspace_id: FromPath[str]
    ) -> dict[str, Any]:
        """The recipient takes the copy; it then lists among their workspaces."""
        state, user = app_state(request), current_user(request)
        row = await _received(user, shared_workspace_id)
        # Under the mapping's lock: a withdrawal at the same moment wins or loses whole.
        if not await shares.accept(row["s_id"], user.id):
            raise _not_found(shared_workspace_id)
        await workflow_ops.signal_share(state.temporal, row["s_id"], "accept")
        return {"success": True, "message": "Successful."}

    @put("/{shared_workspace_id:str}/{put_type:str}/", operation_id="sharedWorkspaceAction",
         include_in_schema=False)
    async def action(
        self, request: Request[Any, Any, Any], shared_workspace_id: FromPath[str],
        put_type: FromPath[str],
    ) -> dict[str, Any]:
        # Any other verb: the contract's 400, after the 404 of a share not received.
        await _received(current_user(request), shared_workspace_id)
        raise BadRequest("Invalid PUT type passed.")

    @delete("/{shared_workspace_id:str}/", status_code=200, operation_id="deleteShare",
            **contract("Withdraw or decline a share",
                       schemas.MessageResponse, 400, 401, 403, 404, 503))
    async def delete_share(
        self, request: Request[Any, Any, Any], shared_workspace_id: FromPath[str]
    ) -> dict[str, Any]:
        """Withdraw (sender) or decline (recipient) a share not yet accepted; its copy is
        removed in the background."""
        state, user = app_state(request), current_user(request)
        sid = parse_id(shared_workspace_id)
        row = await shares.one(sid) if sid is not None else None
        if row is None:
            raise _not_found(shared_workspace_id)
        if user.id not in (row["s_user_id"], row["o_user_id"]):
            raise PermissionDenied(
                f"User does not have permissions for shared workspace {shared_workspace_id}.")
        outcome = await shares.withdraw(row["s_id"])
        if outcome is shares.Withdrawal.missing:
            raise _not_found(shared_workspace_id)
        if outcome is shares.Withdrawal.accepted:
            raise BadRequest(f"Shared workspace {shared_workspace_id} has been accepted and "
                             "cannot be deleted.")
        if not await workflow_ops.signal_share(state.temporal, row["s_id"], "cancel_share"):
            # The share's workflow has ended (its copy failed): delete the copy directly.
            await workflow_ops.start_deletion(state.temporal, state.settings.task_queue,
                                              row["s_id"])
        return {"success": True,
                "message": f"Shared workspace {shared_workspace_id} queued for deletion."}


async def _received(user: AuthUser, raw_id: str) -> dict[str, Any]:
    """The share the caller received named by ``raw_id``, or the contract's 404 (checked
    before the verb)."""
    sid = parse_id(raw_id)
    row = await shares.one(sid) if sid is not None else None
    if row is None or row["s_user_id"] != user.id:
        raise _not_found(raw_id)
    return row


async def _own_workspace(user: AuthUser, raw_id: Any) -> dict[str, Any] | None:
    """The caller's workspace named by ``raw_id`` (an int or a numeric string), unless it
    is a copy they have not accepted yet."""
    workspace_id = parse_id(str(raw_id)) if not isinstance(raw_id, bool) else None
    if workspace_id is None:
        return None
    row = await workspaces.owned(user.id, workspace_id)
    if row is None:
        return None
    pending = await shares.one(workspace_id)
    return None if pending is not None and not pending["is_accepted"] else row


async def _recipients(user_ids: list[Any], sharer: AuthUser) -> list[dict[str, Any]]:
    """The recipients named, in order, once each; only people may receive a share."""
    ids: list[int] = []
    for value in user_ids:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**63:
            raise BadRequest("Invalid user id provided.")
        ids.append(value)
    ids = list(dict.fromkeys(ids))
    if not ids:
        return []
    rows = await shares.recipients(ids)
    by_id = {r["id"]: r for r in rows}
    if set(ids) - set(by_id):
        raise BadRequest("Invalid user id provided.")
    for i in ids:
        if i == sharer.id:
            raise BadRequest("A workspace cannot be shared with yourself.")
        if not by_id[i]["is_active"]:
            raise BadRequest(f"User {i} is inactive and cannot receive shared workspaces.")
        if by_id[i]["is_api_client"]:
            raise BadRequest(f"User {i} is an API client account and cannot receive shared "
                             "workspaces.")
    return [by_id[i] for i in ids]


async def _share_with(state: AppState, user: AuthUser, original: dict[str, Any],
                      recipients: list[dict[str, Any]]) -> list[int]:
    """Insert the copies' rows (their paths fixed now, once) and mappings; start the
    copies. The sender's pending cap and disk quota are decided with the inserts."""
    storage = state.controllers.storage_for(original["storage_name"])
    copies = []
    for recipient in recipients:
        account = await accounts.account_of(recipient["id"], state.controllers.storage_auth)
        copies.append(shares.NewCopy(recipient["id"], partial(storage.workspace_path, account)))
    sharing = state.controllers.config.sharing
    try:
        created = await shares.create(user.id, original["id"], copies,
                                      sharing.max_pending_per_user,
                                      await shares.newest_job(original["id"]))
    except shares.ShareRefused as exc:
        raise BadRequest(str(exc)) from None
    for n, copy_id in enumerate(created):
        try:
            await workflow_ops.start_share(state.temporal, state.settings.task_queue, copy_id,
                                           original["id"], sharing.expiry_days)
        except BaseException:
            # Nothing was copied for these yet: no copy without its workflow is left.
            await asyncio.shield(shares.discard(created[n:]))
            raise
    return created
