"""The statuses of jobs and workspaces, as the API shows them and the database keeps them.

``StrEnum``: each member is its own string ("running"), so rows, JSON payloads and workflow
histories hold plain text, and histories written before these enums read back unchanged.
Pure (standard library only): workflow code imports it too.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    pending = "pending"
    running = "running"
    stopping = "stopping"
    complete = "complete"
    failed = "failed"


# A job in one of these still holds its workspace, its quota and (maybe) a process.
ACTIVE_JOB_STATUSES = (JobStatus.pending, JobStatus.running, JobStatus.stopping)
ENDED_JOB_STATUSES = (JobStatus.complete, JobStatus.failed)


class ResourceStatus(StrEnum):
    """What a compute resource says of a job it launched. ``unknown``: it could not tell
    (unreachable, a transient error), which is never an end."""

    pending = "pending"
    running = "running"
    complete = "complete"
    failed = "failed"
    unknown = "unknown"


class WorkspaceStatus(StrEnum):
    initializing = "initializing"
    idle = "idle"
    active = "active"
    deleting = "deleting"
    error = "error"


# A job may start in a workspace in one of these (``active``: one runs already).
STARTABLE_WORKSPACE_STATUSES = (WorkspaceStatus.idle, WorkspaceStatus.active)
# A workspace in one of these can neither be shared nor start a job.
UNUSABLE_WORKSPACE_STATUSES = (WorkspaceStatus.deleting, WorkspaceStatus.initializing,
                               WorkspaceStatus.error)
# What a resource says of a job that is over.
ENDED_RESOURCE_STATUSES = (ResourceStatus.complete, ResourceStatus.failed)
