"""``/workspaces/``: list, get, create, update, upload, start a job, delete."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.params import FromPath

from api import schemas, workflow_ops
from api.auth import AuthUser, current_user
from api.body import json_body, query_filters
from api.errors import BadRequest, NotFound, ServerError, Unprocessable
from api.field_limits import check_job_details, check_workspace_fields
from api.ids import found_or_raise, parse_id
from api.job_start import start_job
from api.multipart import MultipartReader, boundary_of
from api.openapi import contract, query
from api.responses import json_response
from api.serializers import job_json, origin_of, workspace_json
from api.state import AppState, app_state
from api.workspace_details import parse_workspace_details, request_details
from controllers.base import ExternalAccount, FileSpec, StagedUpload
from controllers.errors import PayloadTooLarge
from core.parameters import validate_resource_options
from core.status import UNUSABLE_WORKSPACE_STATUSES, WorkspaceStatus
from db import accounts, quotas, workspaces
from db.sql import as_json

_FILTERS = workspaces.FILTERS
_FILTER_DOCS = (
    query("name", "Only workspaces of exactly this name."),
    query("description", "Only workspaces of exactly this description."),
    query("status", "Only workspaces in this status.", enum=tuple(WorkspaceStatus)),
)

_CREATE_EXAMPLES = {"files": {
    "name": "analysis", "description": "A first look at the data",
    "default_job_type": "jupyter_lab",
    "workspace_details": {"files": [{"name": "notes.md", "content": "# Notes\n"}],
                          "symlinks": []},
}}
_START_EXAMPLES = {
    "default": {},
    "options": {"job_type": "jupyter_lab", "job_details": {},
                "resource_options": {"num_cpus": 2, "time_limit_min": 60}},
}


def _not_found(workspace_id: Any) -> NotFound:
    return NotFound(f"Workspace {workspace_id} not found for user.")


async def _owned(user: AuthUser, raw_id: str) -> dict[str, Any]:
    """The caller's workspace row, or the contract's 404 (someone else's id included)."""
    return await found_or_raise(raw_id, lambda wid: workspaces.owned(user.id, wid), _not_found)


async def _refuse_unaccepted_copy(workspace_id: int) -> None:
    if await workspaces.is_unaccepted_copy(workspace_id):
        raise BadRequest(
            f"Workspace {workspace_id} is a shared workspace and has not been accepted."
        )


async def _account_for(state: AppState, user: AuthUser) -> ExternalAccount:
    """The user's account under the main storage's auth method (created if missing)."""
    return await accounts.account_of(user.id, state.controllers.storage_auth)


def _check_job_type(state: AppState, value: Any) -> None:
    # Any JSON value may arrive here; a list or an object is no job type (nor hashable).
    if not isinstance(value, str) or value not in state.controllers.config.available_job_types:
        raise BadRequest(f"{value} is not in the list of available job types.")


def _listing(rows: list[Any]) -> Response[bytes]:
    shown = [workspace_json(r) for r in rows]
    message = "Successful." if shown else \
        "Workspace matching given parameters could not be found."
    return json_response({"success": True, "message": message,
                          "data": {"workspaces": shown}})


class WorkspaceRoutes(Controller):
    """A user's workspaces: list, read, create, change, upload into, start a job in, and
    delete them."""

    path = "/workspaces"
    tags = ["workspaces"]

    @get("/", operation_id="listWorkspaces",
         **contract("List the caller's workspaces",
                    schemas.WorkspaceListResponse, 400, 401, 503, filters=_FILTER_DOCS))
    async def list_workspaces(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """The caller's workspaces, filtered by ``name``, ``description``, ``status``.
        Shared copies not yet accepted are not listed."""
        user = current_user(request)
        return _listing(await workspaces.listing(user.id, query_filters(request, _FILTERS)))

    @get("/{workspace_id:str}/", operation_id="getWorkspace",
         **contract("Get one workspace (as a list)",
                    schemas.WorkspaceListResponse, 400, 401, 503, filters=_FILTER_DOCS))
    async def get_workspace(
        self, request: Request[Any, Any, Any], workspace_id: FromPath[str]
    ) -> Response[bytes]:
        """One of the caller's workspaces, in the same list shape as the listing."""
        user = current_user(request)
        wid = parse_id(workspace_id)
        if wid is None:
            return _listing([])
        return _listing(await workspaces.listing(user.id, query_filters(request, _FILTERS),
                                                 wid))

    @post("/", status_code=200, operation_id="createWorkspace",
          **contract("Create a workspace",
                     schemas.WorkspaceCreatedResponse, 400, 401, 413, 500, 503, 507,
                     body=schemas.WorkspaceCreate, examples=_CREATE_EXAMPLES))
    async def create_workspace(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Create a workspace directory with the given files and symlinks.

        A failed create leaves nothing behind: no row, no directory."""
        state, user = app_state(request), current_user(request)
        body = await json_body(request, empty_ok=False)
        if not isinstance(body, dict) or "name" not in body or "description" not in body:
            raise BadRequest("Missing required fields.")
        name, description = body["name"], body["description"]
        if not isinstance(name, str) or not isinstance(description, str):
            raise BadRequest("'name' and 'description' must be strings.")
        check_workspace_fields(body, state.settings)
        default_job_type = body.get("default_job_type") or None
        if default_job_type is not None:
            _check_job_type(state, default_job_type)
        files, symlinks = parse_workspace_details(body.get("workspace_details"))
        storage = state.controllers.main_storage
        await storage.validate_files(files, symlinks)
        account = await _account_for(state, user)

        workspace_id = await workspaces.create(user.id, name, description, storage.name,
                                               default_job_type,
                                               request_details(files, symlinks))
        path = storage.workspace_path(account, workspace_id)
        try:
            # Quota first: a refused create has written nothing (its row goes below).
            claim = await _claim_for_files(user.id, workspace_id, files)
            await workspaces.set_path(workspace_id, path)
            await storage.create_workspace(path, account)
            await storage.write_files(path, account, files, symlinks)
        except BaseException:
            await storage.delete_workspace(path)
            await workspaces.remove(workspace_id)  # and its claim
            raise
        await quotas.finish_claim(claim)
        await workspaces.set_status(workspace_id, WorkspaceStatus.idle)
        await workflow_ops.request_scan(state.temporal, state.settings.task_queue,
                                        workspace_id, "created")
        created = await workspaces.get(workspace_id)
        assert created is not None
        return {"success": True, "message": "Successful.",
                "data": {"workspace": workspace_json(created)}}

    @put("/{workspace_id:str}/", operation_id="updateWorkspace",
         **contract("Update a workspace, add files and symlinks",
                    schemas.MessageResponse, 400, 401, 404, 413, 500, 503, 507,
                    body=schemas.WorkspaceUpdate,
                    examples={"rename": {"name": "analysis 2"}}))
    async def update_workspace(
        self, request: Request[Any, Any, Any], workspace_id: FromPath[str]
    ) -> dict[str, Any]:
        """Rename, re-describe, set the default job type, add files and symlinks."""
        state, user = app_state(request), current_user(request)
        row = await _owned(user, workspace_id)
        await _refuse_unaccepted_copy(row["id"])
        body = await json_body(request, empty_ok=False)
        if not isinstance(body, dict) or not body:
            raise BadRequest("Missing required fields.")
        changes: dict[str, Any] = {}
        for key in ("name", "description"):
            if key in body:
                if not isinstance(body[key], str):
                    raise BadRequest(f"'{key}' must be a string.")
                changes[key] = body[key]
        check_workspace_fields(body, state.settings)
        if "default_job_type" in body:
            value = body["default_job_type"] or None
            if value is not None:
                _check_job_type(state, value)
            changes["default_job_type"] = value
        files, symlinks = parse_workspace_details(body.get("workspace_details"))
        if row["status"] == WorkspaceStatus.deleting:
            raise BadRequest(f"Workspace {row['id']} is being deleted.")
        if files or symlinks:
            storage = state.controllers.storage_for(row["storage_name"])
            await storage.validate_files(files, symlinks)
            account = await _account_for(state, user)
            # Counted in full even where a file is replaced: the next scan settles it.
            claim = await _claim_for_files(user.id, row["id"], files)
            try:
                await storage.write_files(row["file_path"], account, files, symlinks)
            except BaseException:
                await asyncio.shield(quotas.drop_claim(claim))
                raise
            await quotas.finish_claim(claim)
            changes["request_workspace_details"] = request_details(
                files, symlinks, as_json(row["request_workspace_details"])
            )
        await workspaces.edit(row["id"], changes)
        if files or symlinks:
            await workflow_ops.request_scan(state.temporal, state.settings.task_queue,
                                            row["id"], "updated")
        return {"success": True, "message": "Update successful."}

    @put("/{workspace_id:str}/upload/", operation_id="uploadToWorkspace",
         request_max_body_size=None,
         **contract("Upload files into a workspace",
                    schemas.MessageResponse, 400, 401, 404, 413, 503, 507, upload=True))
    async def upload(
        self, request: Request[Any, Any, Any], workspace_id: FromPath[str]
    ) -> dict[str, Any]:
        """Multipart upload; each file part lands in the workspace root under its filename.
        Bodies stream to disk; the configured limit answers 413 past it."""
        state, user = app_state(request), current_user(request)
        row = await _owned(user, workspace_id)
        await _refuse_unaccepted_copy(row["id"])
        if row["status"] == WorkspaceStatus.deleting:
            raise BadRequest(f"Workspace {row['id']} is being deleted.")
        limit = state.settings.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        boundary = boundary_of(request.headers.get("content-type", ""))
        storage = state.controllers.storage_for(row["storage_name"])
        account = await _account_for(state, user)
        reader = MultipartReader(_limited(request.stream(), limit), boundary)
        # The bytes are counted against the disk quota as they arrive, before each chunk is
        # written; every file waits under a temporary name until the whole request fits.
        claim = quotas.DiskClaim(user.id, row["id"])
        received = 0

        async def counted(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            nonlocal received
            async for chunk in chunks:
                received += len(chunk)
                try:
                    await quotas.cover(claim, received)
                except quotas.QuotaExceeded as exc:
                    raise BadRequest(str(exc)) from None
                except quotas.WorkspaceDeleting:
                    raise BadRequest(f"Workspace {row['id']} is being deleted.") from None
                yield chunk

        staged: list[StagedUpload] = []
        try:
            async for part in reader.parts():
                if part.filename is None:
                    await reader.skip()
                    continue
                staged.append(await storage.stage_upload(
                    row["file_path"], account, part.filename, counted(reader.chunks())))
            if not staged:
                raise BadRequest("No files found in request.")
            await storage.commit_uploads(staged)
        except BaseException:
            storage.discard_uploads(staged)
            await asyncio.shield(quotas.drop_claim(claim))
            raise
        storage.discard_uploads(staged)  # all committed: this only closes them
        await quotas.finish_claim(claim, received)
        await workspaces.edit(row["id"], {})
        await workflow_ops.request_scan(state.temporal, state.settings.task_queue,
                                        row["id"], "upload")
        return {"success": True, "message": "Successful upload."}

    @put("/{workspace_id:str}/{put_type:str}/", operation_id="workspaceAction",
         include_in_schema=False)
    async def action(
        self,
        request: Request[Any, Any, Any],
        workspace_id: FromPath[str],
        put_type: FromPath[str],
    ) -> dict[str, Any]:
        # Every other verb: the contract's 400, after the 404 of an id not the caller's.
        await _owned(current_user(request), workspace_id)
        raise BadRequest("Invalid PUT type passed.")

    @put("/{workspace_id:str}/start/", operation_id="startWorkspaceJob",
         **contract("Start a job in a workspace",
                    schemas.JobStartedResponse, 400, 401, 404, 413, 422, 500, 503,
                    body=schemas.JobStart, examples=_START_EXAMPLES))
    async def start(
        self, request: Request[Any, Any, Any], workspace_id: FromPath[str]
    ) -> dict[str, Any]:
        """Start a job in the workspace (its default job type unless ``job_type`` is
        given); the workspace becomes ``active``."""
        state, user = app_state(request), current_user(request)
        row = await _owned(user, workspace_id)
        await _refuse_unaccepted_copy(row["id"])
        # The contract: an empty body is invalid JSON here too ({} starts the default job).
        body = await json_body(request, empty_ok=False)
        if not isinstance(body, dict):
            raise BadRequest("Request body must be a JSON object.")
        job_type = body.get("job_type") or row["default_job_type"]
        if not job_type:
            raise BadRequest("Missing job_type and no default job type set on workspace.")
        _check_job_type(state, job_type)
        job_details = body.get("job_details", {})
        if not isinstance(job_details, dict):
            raise BadRequest("Job details not JSON.")
        check_job_details(job_details, state.settings)
        resource_options = body.get("resource_options", {})
        if not isinstance(resource_options, dict):
            raise BadRequest("Resource options not JSON.")
        errors = validate_resource_options(state.controllers.config.parameters, resource_options)
        if errors:
            raise Unprocessable(f"Invalid resource options found: {errors}")
        if row["status"] in UNUSABLE_WORKSPACE_STATUSES:
            raise BadRequest(f"Workspace {row['id']} is {row['status']} and cannot start jobs.")
        if not row["file_path"] or not await asyncio.to_thread(os.path.isdir, row["file_path"]):
            # Gone because a delete won meanwhile: that delete's answer, not a server error.
            status = await workspaces.status_of(row["id"])
            if status in (None, WorkspaceStatus.deleting):
                raise BadRequest(f"Workspace {row['id']} is deleting and cannot start jobs.")
            raise ServerError(
                "Workspace directory is missing or invalid. Please contact an administrator."
            )
        job = await start_job(state, user, row, job_type, job_details, resource_options)
        return {"success": True, "message": "Successful start.",
                "data": {"job": job_json(job, origin_of(request))}}

    @delete("/{workspace_id:str}/", status_code=200, operation_id="deleteWorkspace",
            **contract("Delete a workspace", schemas.MessageResponse, 400, 401, 404, 503))
    async def delete_workspace(
        self, request: Request[Any, Any, Any], workspace_id: FromPath[str]
    ) -> dict[str, Any]:
        """Queue the workspace for deletion: its directory, then its row."""
        state, user = app_state(request), current_user(request)
        row = await _owned(user, workspace_id)
        wid = row["id"]
        await _refuse_unaccepted_copy(wid)
        # Decided under the workspace's row lock: no start or share slips in between.
        outcome = await workspaces.mark_deleting(wid)
        if outcome is workspaces.Deletion.missing:
            raise _not_found(workspace_id)
        if outcome is workspaces.Deletion.pending_shares:
            raise BadRequest(
                f"Workspace {wid} has shared workspaces associated with it, that have not yet "
                "been accepted. Please cancel those shares to delete this workspace."
            )
        if outcome is workspaces.Deletion.jobs_active:
            raise BadRequest("Cannot delete workspace, jobs are running for this workspace.")
        await workflow_ops.start_deletion(state.temporal, state.settings.task_queue, wid)
        return {"success": True, "message": f"Workspace {wid} queued for deletion."}


def _files_size(files: list[FileSpec]) -> int:
    return sum(len(f.content.encode("utf-8", "surrogatepass")) for f in files)


async def _claim_for_files(user_id: int, workspace_id: int,
                           files: list[FileSpec]) -> quotas.DiskClaim:
    """Claim the files' bytes against the disk quota, or the quota's 400."""
    try:
        return await quotas.claim_disk(user_id, workspace_id, _files_size(files),
                                       "these files need")
    except quotas.QuotaExceeded as exc:
        raise BadRequest(str(exc)) from None
    except quotas.WorkspaceDeleting:
        raise BadRequest(f"Workspace {workspace_id} is being deleted.") from None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Upload exceeds the limit of {limit} bytes.")


async def _limited(stream: Any, limit: int) -> Any:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        yield chunk

