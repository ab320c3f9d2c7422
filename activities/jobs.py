"""Activities of ``JobWorkflow``: each calls a controller and/or the database, and is
idempotent, since Temporal may run any of them again after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from temporalio import activity

from activities.heartbeat import heartbeating
from controllers.base import ExternalAccount, JobContext, JobState, LaunchRequest
from controllers.errors import InvalidRequest
from controllers.registry import Controllers
from core.status import JobStatus, ResourceStatus
from db import accounts, workspaces
from db import jobs as job_rows
from workflows.models import (
    AbandonInput,
    AbandonResult,
    ConnectionInput,
    ConnectionResult,
    FinalizeInput,
    IdleCheck,
    IdleResult,
    JobHandle,
    JobInput,
    JobStatusUpdate,
    LaunchInput,
    PrepareResult,
    StartJobInput,
    StartJobResult,
    StopJobInput,
    WatchInput,
    WatchResult,
)
from workflows.steps import JobSteps

log = logging.getLogger(__name__)

# How often a long watch tells Temporal it is alive (the workflow's heartbeat timeout is
# 15 s; the SDK throttles what it sends to well under that).
_HEARTBEAT_SECONDS = 5.0


def job_dir(workspace_path: str, job_id: int) -> str:
    """Job files live inside the workspace, in a dot-directory scans do not list."""
    return os.path.join(workspace_path, ".jobs", str(job_id))


class JobActivities(JobSteps):
    def __init__(self, controllers: Controllers) -> None:
        self._c = controllers

    async def _account(self, user_id: int, resource_name: str) -> ExternalAccount:
        return await accounts.account_of(user_id, self._c.resource_auth(resource_name))

    @activity.defn
    async def prepare_job(self, inp: JobInput) -> PrepareResult:
        # Heartbeats, as for launch: a worker killed here is replaced in seconds.
        async with heartbeating(_HEARTBEAT_SECONDS):
            account = await self._account(inp.user_id, inp.resource_name)
            return await self._prepare(inp, account)

    async def _prepare(self, inp: JobInput, account: ExternalAccount) -> PrepareResult:
        location = await workspaces.location(inp.workspace_id)
        if location is None or not location["file_path"]:
            # Deleted under the job (or never made): no retry brings it back.
            raise InvalidRequest(f"Workspace {inp.workspace_id} no longer exists.")
        workdir = job_dir(location["file_path"], inp.job_id)
        resource = self._c.resource(inp.resource_name)
        await asyncio.to_thread(_make_job_dir, location["file_path"], inp.job_id, account)
        job_type = self._c.job_type(inp.job_type)
        # Where a session listens is the resource's decision, made here before launch; its
        # secret goes to a file the job reads, never into the script (history) itself.
        session = (await resource.prepare_session(inp.job_id, account)
                   if job_type.interactive else None)
        ctx = JobContext(
            job_id=inp.job_id, workdir=workdir, resource_name=inp.resource_name,
            passthrough_domain=resource.passthrough_domain,
            resource_options=inp.resource_options,
            job_details={**inp.job_details, "workspace_path": location["file_path"]},
            session=session,
        )
        return PrepareResult(workdir=workdir, script=job_type.script(ctx),
                             interactive=job_type.interactive,
                             env={"UWS_WORKSPACE_DIR": location["file_path"]})

    @activity.defn
    async def launch_job(self, inp: LaunchInput) -> JobHandle:
        account = await self._account(inp.user_id, inp.resource_name)
        # Heartbeats: a worker killed mid-launch is noticed in seconds and the launch is
        # retried elsewhere (finding the job it submitted), not after the whole timeout.
        async with heartbeating(_HEARTBEAT_SECONDS):
            return await self._launch(inp, account)

    async def _launch(self, inp: LaunchInput, account: ExternalAccount) -> JobHandle:
        return JobHandle.from_mapping(await self._c.resource(inp.resource_name).launch(
            LaunchRequest(
                job_id=inp.job_id, script=inp.script, workdir=inp.workdir, account=account,
                resource_options=inp.resource_options, env=inp.env,
                time_limit_min=inp.time_limit_min,
            )))

    @activity.defn
    async def start_job(self, inp: StartJobInput) -> StartJobResult:
        """A new job from its row to its first status, in one local activity (each local
        activity costs the worker ~2 ms of CPU: bench/jobs_latency.py): prepare, launch,
        look once, and write "running" with the resource's job id, or "pending" when it
        waits in a queue. Each step is idempotent, so the whole is: a retry after a crash
        prepares again, finds the job it launched and writes the same status."""
        job = inp.job
        account = await self._account(job.user_id, job.resource_name)
        prep = await self._prepare(job, account)
        handle = await self._launch(LaunchInput(
            job_id=job.job_id, resource_name=job.resource_name, workdir=prep.workdir,
            script=prep.script, resource_options=job.resource_options, env=prep.env,
            time_limit_min=job.time_limit_min, user_id=job.user_id,
        ), account)
        resource_job_id = handle.id
        try:
            state = await self._c.resource(job.resource_name).poll(handle.as_mapping())
        except Exception:  # the watch that follows meets (and handles) the same failure
            log.warning("first look at job %s failed", job.job_id, exc_info=True)
            state = None
        if state is not None and state.status == ResourceStatus.running:
            hostname = state.hostname or "127.0.0.1"
            written = JobStatusUpdate(job_id=job.job_id, status=JobStatus.running,
                                      resource_job_id=resource_job_id, set_start=True,
                                      event="running")
        else:
            hostname = ""
            written = JobStatusUpdate(job_id=job.job_id, status=JobStatus.pending,
                                      resource_job_id=resource_job_id, event="launched")
        await _write_status(written)
        return StartJobResult(workdir=prep.workdir, interactive=prep.interactive,
                              handle=handle, hostname=hostname, written=written)

    @activity.defn
    async def abandon_launch(self, inp: AbandonInput) -> AbandonResult:
        resource = self._c.resource(inp.resource_name)
        account = await self._account(inp.user_id, inp.resource_name)
        workdir = inp.workdir
        if not workdir:  # a start in one step: its job directory, as prepare made it
            location = await workspaces.location(inp.workspace_id)
            workdir = job_dir(location["file_path"], inp.job_id) \
                if location and location["file_path"] else ""
        async with heartbeating(_HEARTBEAT_SECONDS):
            used = await resource.abandon(inp.job_id, workdir, account)
        return AbandonResult(core_hours=float(used or 0.0))

    @activity.defn
    async def watch_job(self, inp: WatchInput) -> WatchResult:
        """The job's state as soon as it differs from ``known_status`` or the timeout ends.
        Heartbeats while it waits, so a dead worker is noticed and the watch moves on."""
        resource = self._c.resource(inp.resource_name)
        handle = inp.handle.as_mapping()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + inp.timeout_seconds
        shown = False
        while True:
            state = await resource.poll(handle)
            if state.status == inp.known_status == ResourceStatus.running and not shown:
                shown = True  # once per watch: a write (and NOTIFY) per chunk, not per poll
                if inp.deadline_epoch:
                    await resource.ensure_time_limit(handle, inp.deadline_epoch, state)
                    state = await resource.poll(handle)
                if state.details:
                    await self._show_details(inp.handle.job_id, state.details)
            remaining = deadline - loop.time()
            if state.status != inp.known_status or remaining <= 0:
                break
            if state.status in (ResourceStatus.complete, ResourceStatus.failed) \
                    or _reason_changed(inp, state):
                break
            activity.heartbeat()
            state = await resource.wait(handle, min(remaining, _HEARTBEAT_SECONDS))
            if state.status != inp.known_status or _reason_changed(inp, state):
                break
        return WatchResult(status=state.status, detail=state.detail, exit_code=state.exit_code,
                           core_hours=state.core_hours, hostname=state.hostname)

    @staticmethod
    async def _show_details(job_id: int, details: dict[str, Any]) -> None:
        """What the resource tells of a running job (time left, say) goes into the job's
        current_job_details; a write after the job left ``running`` changes nothing."""
        if job_id:
            await job_rows.record_status(job_id, JobStatus.running, current_job_details=details)

    @activity.defn
    async def stop_job(self, inp: StopJobInput) -> None:
        async with heartbeating(_HEARTBEAT_SECONDS):  # a stop may wait out a grace period
            await self._c.resource(inp.resource_name).stop(inp.handle.as_mapping(),
                                                           inp.grace_seconds)

    @activity.defn
    async def job_connection(self, inp: ConnectionInput) -> ConnectionResult:
        """Whether the session answers yet. Its details (the link with its token, the
        upstream) go straight into the job row: an activity's result is kept in the
        workflow history, which is no place for a session's secret."""
        job_type = self._c.job_type(inp.job_type)
        resource = self._c.resource(inp.resource_name)
        account = await self._account(inp.user_id, inp.resource_name) if inp.user_id else None
        session = resource.session_endpoint(inp.job_id, account) if account else None
        ctx = JobContext(job_id=inp.job_id, workdir=inp.workdir, resource_name=inp.resource_name,
                         passthrough_domain=resource.passthrough_domain,
                         job_details=inp.job_details, session=session)
        found = await job_type.connection(ctx, inp.hostname)
        if found is None:
            return ConnectionResult(ready=False)
        await job_rows.record_status(inp.job_id, JobStatus.running,
                                     current_job_details=found.model_dump())
        return ConnectionResult(ready=True)

    @activity.defn
    async def record_job_status(self, update: JobStatusUpdate) -> JobStatusUpdate:
        """Write the status (and publish it); the update comes back as the result, so a
        local activity's marker, which keeps no input, still tells the job's timeline
        what was written (``api.job_timeline``)."""
        await _write_status(update)
        return update

    @activity.defn
    async def session_idle_seconds(self, inp: IdleCheck) -> IdleResult:
        """Seconds since the session was last used through the passthrough (or started)."""
        stamp = await job_rows.last_session_activity(inp.job_id)
        return IdleResult(seconds=0.0 if stamp is None else max(time.time() - stamp, 0.0))

    @activity.defn
    async def finalize_job(self, inp: FinalizeInput) -> FinalizeInput:
        await job_rows.finalize(inp.job_id, inp.status, inp.core_hours, inp.detail)
        return inp  # for the timeline, as record_job_status does

    def all(self) -> list[Callable[..., Any]]:
        return [self.prepare_job, self.launch_job, self.start_job, self.abandon_launch,
                self.watch_job, self.stop_job, self.job_connection, self.record_job_status,
                self.session_idle_seconds, self.finalize_job]


async def _write_status(update: JobStatusUpdate) -> None:
    await job_rows.record_status(
        update.job_id, update.status, resource_job_id=update.resource_job_id,
        set_start=update.set_start, current_job_details=update.current_job_details,
        event=update.event,
    )


def _reason_changed(inp: WatchInput, state: JobState) -> bool:
    """A queued job whose reason moved on (Priority to Resources, say): worth showing."""
    return (inp.known_detail is not None and state.status == ResourceStatus.pending
            and state.detail != inp.known_detail)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _make_job_dir(workspace: str, job_id: int, account: ExternalAccount) -> None:
    """Create ``.jobs/<id>`` inside the workspace one descriptor at a time, never through a
    link: the account owns the workspace and may have planted one anywhere in it (a
    resource that runs the job's script remotely needs the directory before submitting)."""
    uid = account.uid
    chown = uid is not None and uid != os.geteuid() and os.geteuid() == 0
    fd = os.open(workspace, _DIR_FLAGS)
    try:
        for name in (".jobs", str(job_id)):
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=fd)
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise RuntimeError(f"{name} in workspace {workspace} is not a directory "
                                   f"({exc.strerror})") from None
            os.close(fd)
            fd = child
            if chown and uid is not None and os.fstat(fd).st_uid != uid:
                os.fchown(fd, uid, -1 if account.gid is None else account.gid)
    finally:
        os.close(fd)
