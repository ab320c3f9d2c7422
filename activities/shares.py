"""Activities of ``ShareWorkspaceWorkflow``."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from controllers.base import CopyProgress
from controllers.errors import BackendError
from controllers.notify.email import EmailRejected, Invitation
from controllers.registry import Controllers
from core.status import WorkspaceStatus
from db import accounts, shares, workspaces
from workflows.models import (
    InvitationResult,
    ShareCopyResult,
    ShareRef,
    StatusChange,
    WorkspaceStatusInput,
)
from workflows.steps import ShareSteps

_HEARTBEAT_SECONDS = 2.0


def _out_of_space(err: BaseException) -> bool:
    cause = err.__cause__
    return isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)


def _name(first: str, last: str, fallback: str) -> str:
    return " ".join(p for p in (first, last) if p) or fallback


class ShareActivities(ShareSteps):
    """A share's copy, its invitation, and its copy's status (``ShareWorkspaceWorkflow``)."""

    def __init__(self, controllers: Controllers) -> None:
        self._c = controllers

    @activity.defn
    async def copy_shared_workspace(self, ref: ShareRef) -> ShareCopyResult:
        """Copy, resuming after the last entry an earlier attempt reported."""
        row = await shares.one(ref.shared_workspace_id)
        if row is None:
            raise ApplicationError("the share is gone", type="ShareGone", non_retryable=True)
        storage = self._c.storage_for(row["s_storage"])
        try:
            account = await accounts.account_of(row["s_user_id"], self._c.storage_auth)
        except accounts.UnknownUser as err:
            raise ApplicationError(str(err), non_retryable=True) from err
        target = row["s_path"]
        if not await asyncio.to_thread(os.path.isdir, target):
            await storage.create_workspace(target, account)
        details = activity.info().heartbeat_details
        resume_after = str(details[0]) if details else ""
        latest = CopyProgress(last_path=resume_after)

        def record(progress: CopyProgress) -> None:
            nonlocal latest
            latest = progress
            # The SDK throttles what it sends and keeps the newest details.
            activity.heartbeat(progress.last_path, progress.files_done, progress.bytes_done)

        async def beat() -> None:
            while True:
                activity.heartbeat(latest.last_path, latest.files_done, latest.bytes_done)
                await asyncio.sleep(_HEARTBEAT_SECONDS)

        ticker = asyncio.create_task(beat())
        try:
            done = await storage.copy_workspace(row["o_path"], target, account,
                                                resume_after=resume_after, progress=record)
        except BackendError as err:
            if _out_of_space(err):
                # It cannot finish: give back what its partial files took (a full disk
                # would stay full), keeping the empty directory its row names.
                await storage.delete_workspace(target)
                await storage.create_workspace(target, account)
            raise ApplicationError(err.user_message, type="CopyRefused",
                                   non_retryable=True) from err
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        return ShareCopyResult(files=done.files_done, bytes=done.bytes_done)

    @activity.defn
    async def send_share_invitation(self, ref: ShareRef) -> InvitationResult:
        return InvitationResult(sent=await self._invite(ref))

    async def _invite(self, ref: ShareRef) -> bool:
        row = await shares.one(ref.shared_workspace_id)
        if row is None:
            return False
        expiry = timedelta(days=self._c.config.sharing.expiry_days)
        invitation = Invitation(
            recipient_email=row["s_email"],
            recipient_name=_name(row["s_first_name"], row["s_last_name"], row["s_username"]),
            sharer_name=_name(row["o_first_name"], row["o_last_name"], row["o_username"]),
            sharer_email=row["o_email"],
            workspace_name=row["o_name"],
            workspace_description=row["o_description"],
            shared_workspace_id=ref.shared_workspace_id,
            expires_at=row["datetime_share_created"] + expiry,
        )
        if not invitation.recipient_email:
            return False
        try:
            return await self._c.notifier.send_invitation(invitation)
        except (ValueError, EmailRejected) as err:
            # Retrying cannot fix a refused message or an unusable address; the share
            # stands without its e-mail.
            activity.logger.warning("invitation for share %s not sent: %s",
                                    ref.shared_workspace_id, err,
                                    extra={"workspace_id": ref.shared_workspace_id,
                                           "user_id": row["s_user_id"]})
            return False

    @activity.defn
    async def set_workspace_status(self, inp: WorkspaceStatusInput) -> StatusChange:
        changed = await workspaces.set_status_if(inp.workspace_id, WorkspaceStatus(inp.status),
                                                 inp.reason, inp.only_from)
        return StatusChange(changed=changed)

    def all(self) -> list[Any]:
        return [self.copy_shared_workspace, self.send_share_invitation,
                self.set_workspace_status]


