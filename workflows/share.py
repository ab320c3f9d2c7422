"""``ShareWorkspaceWorkflow``: one per recipient (id ``share-<copy's workspace id>``).

Copy the original's files into the recipient's new workspace (an activity that heartbeats
its progress and resumes after a crash), rescan, mark it ``idle``, send the invitation,
then wait for the recipient: accepted ends the workflow; declined (the share deleted) or
no answer before the expiry removes the copy. A failed copy ends in ``error`` with the
reason, never ``idle``. Mail failures are retried and never fail the share.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from core.status import WorkspaceStatus
    from workflows.failures import root_cause
    from workflows.models import (
        ShareInput,
        ShareRef,
        WorkspaceRef,
        WorkspaceStatusInput,
    )
    from workflows.steps import ShareSteps, WorkspaceSteps

_QUICK = timedelta(seconds=30)
_COPY_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), backoff_coefficient=2.0,
                          maximum_interval=timedelta(minutes=2), maximum_attempts=10)
_MAIL_RETRY = RetryPolicy(initial_interval=timedelta(seconds=5), backoff_coefficient=2.0,
                          maximum_interval=timedelta(minutes=10), maximum_attempts=8)
_FOREVER = RetryPolicy(maximum_interval=timedelta(minutes=1))


@workflow.defn
class ShareWorkspaceWorkflow:
    def __init__(self) -> None:
        self.accepted = False
        self.cancelled = False
        self.stage = "copying"

    @workflow.signal
    def accept(self) -> None:
        self.accepted = True

    @workflow.signal
    def cancel_share(self) -> None:
        self.cancelled = True

    @workflow.query
    def current_stage(self) -> str:
        return self.stage

    @workflow.run
    async def run(self, inp: ShareInput) -> str:
        ref = ShareRef(shared_workspace_id=inp.shared_workspace_id)
        copy = workflow.start_activity_method(
            ShareSteps.copy_shared_workspace, ref,
            start_to_close_timeout=timedelta(hours=12), heartbeat_timeout=timedelta(seconds=30),
            retry_policy=_COPY_RETRY,
        )
        await workflow.wait_condition(lambda: copy.done() or self.cancelled)
        if not copy.done():
            copy.cancel()
            with contextlib.suppress(ActivityError, asyncio.CancelledError):
                await copy
            return await self._discard(inp, "cancelled")
        try:
            copy.result()
        except ActivityError as err:
            reason = f"Copy failed: {root_cause(err)}"
            await self._status(inp.shared_workspace_id, WorkspaceStatus.error, reason,
                               [WorkspaceStatus.initializing])
            self.stage = "failed"
            return "failed"

        await workflow.execute_activity_method(
            WorkspaceSteps.scan_workspace, WorkspaceRef(workspace_id=inp.shared_workspace_id),
            start_to_close_timeout=timedelta(minutes=30), heartbeat_timeout=timedelta(minutes=1),
            retry_policy=_FOREVER)
        await self._status(inp.shared_workspace_id, WorkspaceStatus.idle, "",
                           [WorkspaceStatus.initializing])
        self.stage = "invited"
        try:
            await workflow.execute_activity_method(
                ShareSteps.send_share_invitation, ref, start_to_close_timeout=timedelta(minutes=2),
                retry_policy=_MAIL_RETRY)
        except ActivityError as err:
            workflow.logger.warning("invitation for share %s not sent: %s",
                                    inp.shared_workspace_id, root_cause(err))

        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(lambda: self.accepted or self.cancelled,
                                          timeout=timedelta(seconds=inp.expiry_seconds))
        if self.accepted and not self.cancelled:
            self.stage = "accepted"
            return "accepted"
        return await self._discard(inp, "cancelled" if self.cancelled else "expired")

    async def _discard(self, inp: ShareInput, outcome: str) -> str:
        """Remove the copy: directory first, then its row (and with it the mapping)."""
        self.stage = outcome
        await self._status(inp.shared_workspace_id, WorkspaceStatus.deleting,
                           f"Share {outcome}.", [])
        ref = WorkspaceRef(workspace_id=inp.shared_workspace_id)
        await workflow.execute_activity_method(
            WorkspaceSteps.delete_workspace_directory, ref,
            start_to_close_timeout=timedelta(minutes=30), heartbeat_timeout=timedelta(minutes=1),
            retry_policy=_FOREVER)
        await workflow.execute_activity_method(
            WorkspaceSteps.delete_workspace_row, ref, start_to_close_timeout=_QUICK,
            retry_policy=_FOREVER)
        return outcome

    async def _status(self, workspace_id: int, status: str, reason: str,
                      only_from: list[str]) -> None:
        await workflow.execute_activity_method(
            ShareSteps.set_workspace_status,
            WorkspaceStatusInput(workspace_id=workspace_id, status=status, reason=reason,
                                 only_from=only_from),
            start_to_close_timeout=_QUICK, retry_policy=_FOREVER)

