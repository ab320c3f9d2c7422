"""``DeleteWorkspaceWorkflow``: remove a workspace's directory, then its row.

The API has already marked the workspace ``deleting``. The directory goes first so a row
never outlives a partly removed directory unnoticed; if removal keeps failing the
workspace ends in ``error`` with the reason, never half deleted and silently ``idle``.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.failures import root_cause
    from workflows.models import (
        DeleteWorkspaceInput,
        DeleteWorkspaceResult,
        WorkspaceErrorInput,
        WorkspaceRef,
    )
    from workflows.steps import WorkspaceSteps

_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=8,
)


@workflow.defn
class DeleteWorkspaceWorkflow:
    @workflow.run
    async def run(self, inp: DeleteWorkspaceInput) -> DeleteWorkspaceResult:
        ref = WorkspaceRef(workspace_id=inp.workspace_id)
        try:
            await workflow.execute_activity_method(
                WorkspaceSteps.delete_workspace_directory, ref,
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(minutes=1),
                retry_policy=_RETRY,
            )
            await workflow.execute_activity_method(
                WorkspaceSteps.delete_workspace_row, ref,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=_RETRY,
            )
        except ActivityError as err:
            reason = f"Deletion failed: {root_cause(err)}"
            workflow.logger.warning("workspace %s: %s", inp.workspace_id, reason)
            await workflow.execute_activity_method(
                WorkspaceSteps.mark_workspace_error,
                WorkspaceErrorInput(workspace_id=inp.workspace_id, reason=reason),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=1)),
            )
            return DeleteWorkspaceResult(deleted=False, reason=reason)
        return DeleteWorkspaceResult(deleted=True)

