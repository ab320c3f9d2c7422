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

# Bounded so a workspace changed forever still closes and starts afresh (short history).
_MAX_SCANS_PER_RUN = 100


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
        while self._pending and len(results) < _MAX_SCANS_PER_RUN:
            self._pending = 0
            result: ScanResult = await workflow.execute_activity(
                "scan_workspace", WorkspaceRef(workspace_id=inp.workspace_id),
                result_type=ScanResult,
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(minutes=1),
                retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=1)),
            )
            results.append(result)
            if not result.found:
                break
        if self._pending:
            workflow.continue_as_new(inp)
        return ScanWorkflowResult(scans=len(results), results=results[-5:])
