"""``/jobs/``: list, get, stop, extend."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, put
from litestar.openapi.spec import OpenAPIType
from litestar.params import FromPath
from temporalio.client import WorkflowUpdateFailedError

from api import schemas
from api.auth import AuthUser, current_user
from api.body import json_body, query_filters
from api.errors import BadRequest, NotFound
from api.ids import found_or_raise, parse_id
from api.job_timeline import job_timeline
from api.openapi import contract, query
from api.responses import json_response
from api.serializers import job_json, origin_of
from api.session_links import with_ticket
from api.state import app_state
from api.workflow_ops import signal_stop
from core.status import ACTIVE_JOB_STATUSES, JobStatus
from db import jobs as job_rows
from db import quotas
from db.sql import as_json
from workflows.job import JobWorkflow
from workflows.models import ExtendRequest, job_workflow_id

_FILTERS = ("workspace_id", "resource_job_id", "job_type", "status")
_FILTER_DOCS = (
    query("workspace_id", "Only the jobs of this workspace.", OpenAPIType.INTEGER),
    query("resource_job_id", "Only the job with this id on its resource.",
          OpenAPIType.INTEGER),
    query("job_type", "Only jobs of this job type id."),
    query("status", "Only jobs in this status.",
          enum=tuple(JobStatus)),
)
_DEFAULT_MAX_MINUTES = 480


def _not_found(job_id: Any) -> NotFound:
    return NotFound(f"Job {job_id} not found for user.")


def _listing(request: Request[Any, Any, Any], rows: list[dict[str, Any]]) -> Response[bytes]:
    state, user = app_state(request), current_user(request)
    origin = origin_of(request)
    jobs = [with_ticket(job_json(r, origin), user.id, state.secret_key,
                        state.settings.ticket_seconds) for r in rows]
    message = "Successful." if jobs else "Job matching given parameters could not be found."
    return json_response({"success": True, "message": message, "data": {"jobs": jobs}})


async def _filtered(request: Request[Any, Any, Any], user: AuthUser,
                    job_id: int | None = None) -> list[dict[str, Any]]:
    """The user's jobs matching the query's filters (none for a number out of range)."""
    filters: dict[str, Any] = {}
    for key, value in query_filters(request, _FILTERS).items():
        if key in ("workspace_id", "resource_job_id"):
            number = int(value) if value.lstrip("-").isdigit() else None
            if number is None or abs(number) > 2**63 - 1:
                return []
            filters[key] = number
        else:
            filters[key] = value
    return await job_rows.listing(user.id, job_id=job_id, **filters)


async def _owned(user: AuthUser, raw_id: str) -> dict[str, Any]:
    return await found_or_raise(raw_id, lambda job_id: job_rows.owned(user.id, job_id),
                                _not_found)


class JobRoutes(Controller):
    """A user's jobs: list and read them, stop one, extend its time, see its timeline."""

    path = "/jobs"
    tags = ["jobs"]

    @get("/", operation_id="listJobs",
         **contract("List the caller's jobs",
                    schemas.JobListResponse, 400, 401, 503, filters=_FILTER_DOCS))
    async def list_jobs(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """The caller's jobs, filtered by ``workspace_id``, ``resource_job_id``,
        ``job_type``, ``status``."""
        return _listing(request, await _filtered(request, current_user(request)))

    @get("/{job_id:str}/", operation_id="getJob",
         **contract("Get one job (as a list)",
                    schemas.JobListResponse, 400, 401, 503, filters=_FILTER_DOCS))
    async def get_job(self, request: Request[Any, Any, Any],
                      job_id: FromPath[str]) -> Response[bytes]:
        """One of the caller's jobs, in the listing's shape."""
        jid = parse_id(job_id)
        rows = await _filtered(request, current_user(request), jid) if jid is not None else []
        return _listing(request, rows)

    @get("/{job_id:str}/events/", operation_id="getJobEvents",
         **contract("A job's timeline", schemas.JobEventsResponse, 401, 404, 503))
    async def job_events(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> dict[str, Any]:
        """The job's timeline from its workflow history: status changes, stop requests,
        extensions, retried steps with their errors, times in UTC."""
        row = await _owned(current_user(request), job_id)
        events = await job_timeline(app_state(request).temporal, row["id"])
        return {"success": True, "message": "Successful.", "data": {"events": events or []}}

    @put("/{job_id:str}/stop/", operation_id="stopJob",
         **contract("Stop a job", schemas.MessageResponse, 400, 401, 404, 503))
    async def stop(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> dict[str, Any]:
        """Stop a pending or running job: ``stopping`` now, ``complete`` once its
        resource has ended it."""
        return await _act(request, job_id, "stop")

    @put("/{job_id:str}/extend/", operation_id="extendJob",
         **contract("Extend a job's time limit", schemas.TimeLimitResponse, 400, 401, 404, 413, 503,
                    body=schemas.JobExtend, examples={"an hour": {"minutes": 60}}))
    async def extend(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> dict[str, Any]:
        """Give a pending or running job more time, within the time limit parameter's
        maximum and the caller's core-hour quota."""
        return await _act(request, job_id, "extend")

    @put("/{job_id:str}/{put_type:str}/", operation_id="jobAction", include_in_schema=False)
    async def action(
        self, request: Request[Any, Any, Any], job_id: FromPath[str], put_type: FromPath[str]
    ) -> dict[str, Any]:
        # Any other verb: the contract's 400, after the 404 of a job not the caller's.
        return await _act(request, job_id, put_type)

    @put("/{job_id:str}/events/", operation_id="jobActionEvents", include_in_schema=False)
    async def put_events(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> dict[str, Any]:
        # The static ``events`` segment would otherwise shadow ``{put_type}`` with a 405;
        # to a client of the contract it is just one more invalid PUT type.
        return await _act(request, job_id, "events")


async def _act(request: Request[Any, Any, Any], job_id: str, put_type: str) -> dict[str, Any]:
    row = await _owned(current_user(request), job_id)
    if put_type == "stop":
        return await _stop(request, row)
    if put_type == "extend":
        return await _extend(request, row)
    raise BadRequest("Invalid PUT type passed.")


async def _stop(request: Request[Any, Any, Any], row: dict[str, Any]) -> dict[str, Any]:
    state = app_state(request)
    if row["status"] not in ACTIVE_JOB_STATUSES:
        raise BadRequest("This job is not running or pending.")
    # The signal goes first: were ``stopping`` written first and the signal then lost
    # (Temporal unreachable), a retry would be refused and the job would run to its time
    # limit. An unreachable Temporal raises here (the app's 503) with the row unchanged.
    await signal_stop(state.temporal, row["id"])
    if row["status"] == JobStatus.stopping:
        # A retry, or a stop after the workflow began stopping on its own: the signal was
        # sent again (the workflow keeps the first reason); the contract's answer for a
        # job already stopping is the 400.
        raise BadRequest("This job is not running or pending.")
    # A job whose launch has not happened yet is stopped by its workflow too (the launch
    # races the stop and whatever it began is abandoned): "queued", as the reference says
    # for every pending job.
    if not await job_rows.record_status(row["id"], JobStatus.stopping,
                                        event="stop requested"):
        raise BadRequest("This job is not running or pending.")
    return {"success": True, "message": "Job queued to stop."}


async def _extend(request: Request[Any, Any, Any], row: dict[str, Any]) -> dict[str, Any]:
    state = app_state(request)
    body = await json_body(request)
    minutes = body.get("minutes") if isinstance(body, dict) else None
    if not isinstance(minutes, int) or isinstance(minutes, bool) or minutes < 1:
        raise BadRequest("'minutes' must be a positive integer.")
    if row["status"] not in (JobStatus.pending, JobStatus.running):
        raise BadRequest("This job is not running or pending.")
    param = state.controllers.config.parameter("time_limit_min")
    max_total = int(param.validation.max) if param and param.validation.max else \
        _DEFAULT_MAX_MINUTES
    cpus = as_json(row["resource_options"]).get("num_cpus", 1)
    cpus = cpus if isinstance(cpus, int) and cpus > 0 else 1
    extra = cpus * minutes / 60
    try:
        await quotas.reserve_core_hours(row["user"], extra, f"{cpus} CPU x {minutes} minutes")
    except quotas.QuotaExceeded as exc:
        raise BadRequest(str(exc)) from None
    handle = state.temporal.get_workflow_handle(job_workflow_id(row["id"]))
    try:
        result = await handle.execute_update(
            JobWorkflow.extend_time_limit,
            ExtendRequest(minutes=minutes, max_total_minutes=max_total),
        )
    except WorkflowUpdateFailedError as err:
        await quotas.release_core_hours(row["user"], extra)
        cause = err.cause
        raise BadRequest(getattr(cause, "message", None) or str(cause)) from None
    except BaseException:
        await quotas.release_core_hours(row["user"], extra)
        raise
    await job_rows.add_reservation(row["id"], extra)
    await job_rows.set_time_limit(row["id"], result.time_limit_min)
    return {"success": True, "message": "Time limit extended.",
            "data": {"time_limit_min": result.time_limit_min}}
