"""``ScanWorkspaceWorkflow``: keep a workspace's disk usage and file list current.

Started with signal-with-start after every create, update and upload, under one id per
workspace: changes that arrive while a scan runs coalesce into one more scan, and Temporal
refuses to close the workflow while a signal is unhandled, so no change is missed.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.models import (
        ScanRequest,
        ScanResult,
        ScanWorkflowResult,
        ScanWorkspaceInput,
        WorkspaceRef,
    )
    from workflows.steps import WorkspaceSteps

# Bounded: a workspace that can never be scanned (its directory gone for good, its path
# no longer inside the storage root) ends the workflow, failed with the reason, instead of
# retrying forever. Ten attempts ride out a few minutes of outage (1 s doubling to 1 min);
# a scan given up on is redone by the next change or the usage upkeep's rescan of all.
_SCAN_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=1), maximum_attempts=10)


@workflow.defn
class ScanWorkspaceWorkflow:
    def __init__(self) -> None:
        self._pending = 0

    @workflow.signal
    def rescan(self, request: ScanRequest) -> None:
        self._pending += 1

    @workflow.run
    async def run(self, inp: ScanWorkspaceInput) -> ScanWorkflowResult:
        results: list[ScanResult] = []
        self._pending = max(self._pending, 1)
        # Bounded (``inp.max_scans``) so a workspace changed forever still closes and starts
        # afresh with a short history; the signals still pending carry over.
        while self._pending and len(results) < inp.max_scans:
            self._pending = 0
            result: ScanResult = await workflow.execute_activity_method(
                WorkspaceSteps.scan_workspace, WorkspaceRef(workspace_id=inp.workspace_id),
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(minutes=1),
                retry_policy=_SCAN_RETRY,
            )
            results.append(result)
            if not result.found:
                break
        if self._pending:
            workflow.continue_as_new(inp)
        return ScanWorkflowResult(scans=len(results), results=results[-5:])
