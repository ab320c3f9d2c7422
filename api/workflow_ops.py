"""Starting and signalling the workflows behind API requests."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from workflows.job import JobWorkflow
from workflows.models import (
    DeleteWorkspaceInput,
    ScanRequest,
    ScanWorkspaceInput,
    ShareInput,
    StopRequest,
    delete_workflow_id,
    job_workflow_id,
    scan_workflow_id,
    share_workflow_id,
)
from workflows.share import ShareWorkspaceWorkflow
from workflows.workspace_delete import DeleteWorkspaceWorkflow
from workflows.workspace_scan import ScanWorkspaceWorkflow


async def request_scan(client: Client, task_queue: str, workspace_id: int, reason: str) -> None:
    """Ask for a rescan; concurrent requests coalesce into the running scan workflow."""
    await client.start_workflow(
        ScanWorkspaceWorkflow.run,
        ScanWorkspaceInput(workspace_id=workspace_id),
        id=scan_workflow_id(workspace_id),
        task_queue=task_queue,
        start_signal="rescan",
        start_signal_args=[ScanRequest(reason=reason)],
    )


async def start_deletion(client: Client, task_queue: str, workspace_id: int) -> None:
    """Start the deletion workflow; asking again while it runs is a no-op."""
    await client.start_workflow(
        DeleteWorkspaceWorkflow.run,
        DeleteWorkspaceInput(workspace_id=workspace_id),
        id=delete_workflow_id(workspace_id),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


async def start_share(client: Client, task_queue: str, shared_workspace_id: int,
                      original_workspace_id: int, expiry_days: float) -> None:
    await client.start_workflow(
        ShareWorkspaceWorkflow.run,
        ShareInput(shared_workspace_id=shared_workspace_id,
                   original_workspace_id=original_workspace_id,
                   expiry_seconds=expiry_days * 86400),
        id=share_workflow_id(shared_workspace_id),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


async def signal_share(client: Client, shared_workspace_id: int, signal: str) -> bool:
    """Signal the share's workflow; ``False`` when it is no longer running."""
    handle = client.get_workflow_handle(share_workflow_id(shared_workspace_id))
    try:
        await handle.signal(signal)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def signal_stop(client: Client, job_id: int) -> None:
    """Tell the job's workflow to stop; safe to repeat (the workflow keeps the first
    request). A workflow that no longer exists needs no stop; any other failure (Temporal
    unreachable) is raised, so the caller changes nothing and the client can retry."""
    handle = client.get_workflow_handle(job_workflow_id(job_id))
    try:
        await handle.signal(JobWorkflow.request_stop, StopRequest(reason="Stopped by user."))
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
