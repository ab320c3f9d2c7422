"""Starting a job: insert its row and mark the workspace active (one transaction, under
the workspace's row lock), start ``JobWorkflow``."""

from __future__ import annotations

from typing import Any

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import WorkflowAlreadyStartedError

from api.auth import AuthUser
from api.errors import BadRequest, ServiceUnavailable
from api.state import AppState
from core.parameters import effective_options
from core.status import JobStatus
from db import quotas, workspaces
from db.jobs import finalize
from workflows.job import JobWorkflow
from workflows.models import JobContinuation, JobInput, JobRunState, job_workflow_id

JOB_ID = SearchAttributeKey.for_int("UwsJobId")
USER_ID = SearchAttributeKey.for_int("UwsUserId")
WORKSPACE_ID = SearchAttributeKey.for_int("UwsWorkspaceId")
JOB_TYPE = SearchAttributeKey.for_keyword("UwsJobType")
RESOURCE = SearchAttributeKey.for_keyword("UwsResource")
STATUS = SearchAttributeKey.for_keyword("UwsStatus")

DEFAULT_TIME_LIMIT_MIN = 60


def time_limit_for(state: AppState, job_type: str, resource: str, given: dict[str, Any],
                   effective: dict[str, Any]) -> float:
    """The client's ``time_limit_min``, else the job type's default, else the parameter's."""
    if isinstance(given.get("time_limit_min"), int):
        return int(given["time_limit_min"])
    default = state.controllers.job_types[job_type].default_time_limit_min(resource)
    if default:
        return float(default)
    value = effective.get("time_limit_min")
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_TIME_LIMIT_MIN


async def start_job(
    state: AppState, user: AuthUser, workspace: dict[str, Any], job_type: str,
    job_details: dict[str, Any], resource_options: dict[str, Any],
) -> dict[str, Any]:
    config = state.controllers.config
    resource = config.main_resource
    state.controllers.job_types[job_type].validate_job_details(job_details)
    options = effective_options(config.parameters, resource_options)
    time_limit = time_limit_for(state, job_type, resource, resource_options, options)

    cpus = options.get("num_cpus", 1)
    cpus = cpus if isinstance(cpus, int) and cpus > 0 else 1
    reserve = cpus * time_limit / 60
    try:
        await quotas.check_disk(user.id)
        await quotas.reserve_core_hours(
            user.id, reserve, f"{cpus} CPU{'s' if cpus > 1 else ''} x {time_limit:g} minutes")
    except quotas.QuotaExceeded as exc:
        raise BadRequest(str(exc)) from None

    # The workspace's row lock decides between this start and a concurrent delete.
    claim = await workspaces.insert_job(
        workspace["id"], user.id, job_type, resource, options,
        # time_limit_min: the page's countdown (the deadline runs from the job's creation).
        {"metrics": {"reserved_core_hours": reserve, "time_limit_min": time_limit},
         "request_job_details": job_details,
         "current_job_details": {}})
    if claim.job is None:
        await quotas.release_core_hours(user.id, reserve)
        raise BadRequest(f"Workspace {workspace['id']} is {claim.status} and cannot "
                         "start jobs.")
    job = claim.job

    inp = JobInput(
        job_id=job["id"], user_id=user.id, workspace_id=workspace["id"], job_type=job_type,
        resource_name=resource, time_limit_min=time_limit, resource_options=options,
        job_details=job_details, reserved_core_hours=reserve,
        idle_timeout_min=state.controllers.job_types[job_type].idle_timeout_min(resource),
        max_pending_min=state.controllers.job_types[job_type].max_pending_min(resource),
    )
    try:
        await state.temporal.start_workflow(
            JobWorkflow.run, JobContinuation(inp=inp, state=JobRunState()),
            id=job_workflow_id(job["id"]), task_queue=state.settings.task_queue,
            search_attributes=TypedSearchAttributes([
                SearchAttributePair(JOB_ID, job["id"]),
                SearchAttributePair(USER_ID, user.id),
                SearchAttributePair(WORKSPACE_ID, workspace["id"]),
                SearchAttributePair(JOB_TYPE, job_type),
                SearchAttributePair(RESOURCE, resource),
                SearchAttributePair(STATUS, JobStatus.pending),
            ]),
            static_summary=f"{job_type} job {job['id']} of user {user.username} "
                           f"in workspace {workspace['id']}",
        )
    except WorkflowAlreadyStartedError:
        pass  # a retried request: the job already has its workflow
    except Exception as exc:
        await finalize(job["id"], JobStatus.failed, 0.0, f"Could not start: {exc}")
        raise ServiceUnavailable(
            "The job could not be started because the workflow service is unavailable. "
            "Please try again shortly."
        ) from exc
    return job
