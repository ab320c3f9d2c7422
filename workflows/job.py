"""``JobWorkflow``: one per job (id ``job-<id>``), from launch to its last core-hour.

start (prepare, launch, first look: ``job_start``; a retried launch finds the job it
launched) → watch with the resource's cheapest signal (process exit locally) → learn how
to reach an interactive session → end on the job's own end, a stop request or the time
limit → stop if needed → finalize (status, end time, core-hours, quota, workspace) →
rescan the workspace.

A resource that cannot answer is not a finished job: ``unknown`` is retried with backoff,
never read as ``complete`` or ``failed``. The whole state is one object, so the history
stays bounded by continuing as new.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from core.status import JobStatus, ResourceStatus
    from workflows.job_options import (
        PATCH_EXTEND_RESTARTS_WATCH,
        PATCH_LAUNCH_RACES,
        PATCH_LOCAL_RECORDS,
        PATCH_PENDING_REASON,
        QUICK,
        RETRY_FOREVER,
        WATCH_HEARTBEAT,
        permanent_reason,
    )
    from workflows.job_start import JobStart
    from workflows.models import (
        ConnectionInput,
        ConnectionResult,
        ExtendRequest,
        ExtendResult,
        FinalizeInput,
        IdleCheck,
        IdleResult,
        JobContinuation,
        JobInput,
        JobSnapshot,
        JobStatusUpdate,
        StopJobInput,
        StopRequest,
        WatchInput,
        WatchResult,
        WorkspaceRef,
    )
    from workflows.steps import JobSteps, WorkspaceSteps

STATUS_KEY = SearchAttributeKey.for_keyword("UwsStatus")

# A watch returns at the latest after this long, so a stop or a deadline is never late
# by more than a signal's delivery, and histories grow by a few events per chunk.
_WATCH_CHUNK_SECONDS = 300.0
_MAX_UNKNOWN_BACKOFF = 60.0


def _idle_check_every(timeout_min: float) -> float:
    """How often an idle-stopping session is checked: a few times per timeout."""
    return min(max(timeout_min * 60 / 4, 1.0), 60.0)


@workflow.defn
class JobWorkflow(JobStart):
    @workflow.init
    def __init__(self, cont: JobContinuation) -> None:
        # State comes from the input here, not in ``run``: a stop signal delivered with the
        # first task must find the state it belongs to, never be overwritten by it.
        self.inp: JobInput | None = cont.inp
        self.state = cont.state
        self.status: str = JobStatus.pending

    # --- messages ---------------------------------------------------------------------

    @workflow.signal
    def request_stop(self, req: StopRequest) -> None:
        if not self.state.stop_requested:
            self.state.stop_requested = True
            self.state.stop_reason = req.reason

    @workflow.update
    def extend_time_limit(self, req: ExtendRequest) -> ExtendResult:
        self.state.deadline_epoch += req.minutes * 60
        self.state.extended_minutes += req.minutes
        return ExtendResult(time_limit_min=self._time_limit_min(),
                            deadline_epoch=self.state.deadline_epoch)

    @extend_time_limit.validator
    def _validate_extend(self, req: ExtendRequest) -> None:
        if self.status not in (JobStatus.pending, JobStatus.running) or self.state.stop_requested:
            raise ValueError("This job is not running or pending.")
        if req.minutes < 1:
            raise ValueError("minutes must be a positive integer.")
        if self._time_limit_min() + req.minutes > req.max_total_minutes:
            raise ValueError(
                f"The time limit cannot exceed {req.max_total_minutes} minutes "
                f"(now {self._time_limit_min():g})."
            )

    @workflow.query
    def snapshot(self) -> JobSnapshot:
        return JobSnapshot(phase=self.state.phase, status=self.status,
                           deadline_epoch=self.state.deadline_epoch,
                           stop_requested=self.state.stop_requested)

    # --- run --------------------------------------------------------------------------

    @workflow.run
    async def run(self, cont: JobContinuation) -> str:
        inp, st = self._inp, self.state
        if st.deadline_epoch == 0.0:
            st.deadline_epoch = workflow.now().timestamp() + inp.time_limit_min * 60
        if st.pending_since == 0.0:
            st.pending_since = workflow.now().timestamp()
        if st.phase == "launched":
            self.status = JobStatus.running if st.hostname else JobStatus.pending

        if st.phase == "new":
            if workflow.patched(PATCH_LAUNCH_RACES):
                await self._launch_racing()
            else:
                await self._launch()
        if st.phase == "launched":
            status, core_hours, detail = await self._watch()
        elif st.fail_reason:  # it never reached the resource, and never will
            status, core_hours, detail = JobStatus.failed, st.abandoned_core_hours, st.fail_reason
        else:  # stopped (or out of time) before its launch was through
            status, core_hours = JobStatus.complete, st.abandoned_core_hours
            detail = st.stop_reason or "Time limit reached."
        await self._finalize(status, core_hours, detail)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return status

    async def _watch(self) -> tuple[str, float, str]:
        inp, st = self._inp, self.state
        assert st.handle is not None
        connection_backoff = 1.0
        show_reason = workflow.patched(PATCH_PENDING_REASON)
        for _ in range(inp.loops_before_continue):
            if (self.status == JobStatus.pending and self._pending_remaining() <= 0
                    and not st.fail_reason):
                st.fail_reason = self._still_pending()
            if st.stop_requested or self._remaining() <= 0 or st.fail_reason:
                return await self._stop()
            chunk = min(self._remaining(), _WATCH_CHUNK_SECONDS)
            if self.status == JobStatus.pending and inp.max_pending_min:
                chunk = min(chunk, max(self._pending_remaining(), 0.001))
            if inp.idle_timeout_min and self.status == JobStatus.running:
                chunk = min(chunk, _idle_check_every(inp.idle_timeout_min))
            if (self.status == JobStatus.running and not st.connection_known
                    and inp.job_details.get("interactive")):
                chunk = min(chunk, connection_backoff)
            queued = show_reason and self.status == JobStatus.pending
            known_reason = st.pending_reason if queued else None
            result = await self._watch_once(chunk, known_reason)
            if result is None:  # interrupted by a stop request or the deadline
                continue
            if result.status in (ResourceStatus.complete, ResourceStatus.failed):
                return result.status, result.core_hours or 0.0, result.detail
            if result.status == ResourceStatus.unknown:
                st.unknown_streak += 1
                await self._record(JobStatusUpdate(
                    job_id=inp.job_id, status=self.status,
                    event=f"resource unreachable: {result.detail}",
                ))
                await self._sleep_unless_stopped(
                    min(2.0 ** st.unknown_streak, _MAX_UNKNOWN_BACKOFF))
                continue
            st.unknown_streak = 0
            if known_reason is not None and result.status == ResourceStatus.pending \
                    and result.detail != st.pending_reason:
                await self._show_pending_reason(result.detail)
            if result.status == ResourceStatus.running and self.status != JobStatus.running:
                st.hostname = result.hostname or "127.0.0.1"
                # A reason shown while queued no longer holds.
                cleared = {"pending_reason": None} if st.pending_reason else None
                await self._record(JobStatusUpdate(
                    job_id=inp.job_id, status=JobStatus.running, set_start=True, event="running",
                    current_job_details=cleared,
                ))
            if (self.status == JobStatus.running and not st.connection_known
                    and inp.job_details.get("interactive")):
                connection_backoff = min(connection_backoff * 1.5, 10.0)
                await self._learn_connection()
            if inp.idle_timeout_min and self.status == JobStatus.running:
                await self._stop_if_idle(inp.idle_timeout_min)
        # Bounded history: carry the whole state into a fresh run.
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(JobContinuation(inp=inp, state=st))

    async def _show_pending_reason(self, reason: str) -> None:
        self.state.pending_reason = reason
        await self._record(JobStatusUpdate(
            job_id=self._inp.job_id, status=JobStatus.pending,
            current_job_details={"pending_reason": reason or None},
            event=f"queued: {reason}" if reason else "queued",
        ))

    async def _watch_once(self, seconds: float,
                          known_reason: str | None = None) -> WatchResult | None:
        st = self.state
        assert st.handle is not None
        handle = workflow.start_activity_method(
            JobSteps.watch_job,
            WatchInput(resource_name=self._inp.resource_name, handle=st.handle,
                       timeout_seconds=max(seconds, 0.0), known_status=self.status,
                       deadline_epoch=st.deadline_epoch, known_detail=known_reason),
            start_to_close_timeout=timedelta(seconds=seconds + 120),
            heartbeat_timeout=WATCH_HEARTBEAT,
            retry_policy=RETRY_FOREVER,
        )
        # An extension restarts the watch, whose activity then tells the resource (Slurm
        # would otherwise end the job at the limit it was submitted with). Histories from
        # before this behaviour replay without it.
        watched_deadline = st.deadline_epoch
        restart_on_extend = workflow.patched(PATCH_EXTEND_RESTARTS_WATCH)

        def interrupted() -> bool:
            extended = restart_on_extend and st.deadline_epoch != watched_deadline
            return handle.done() or st.stop_requested or extended

        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(interrupted, timeout=max(self._remaining(), 0.001))
        if not handle.done():
            handle.cancel()
            try:
                await handle
            except (ActivityError, asyncio.CancelledError):
                pass
            return None
        try:
            return handle.result()
        except ActivityError as err:  # the resource can never tell (it is gone, say)
            reason = permanent_reason(err)
            if reason is None:
                raise
            st.fail_reason = reason
            return WatchResult(status=ResourceStatus.failed, detail=reason)

    async def _learn_connection(self) -> None:
        inp, st = self._inp, self.state
        try:
            found = await self._connection_activity()
        except ActivityError as err:
            reason = permanent_reason(err)
            if reason is None:
                raise
            st.fail_reason = reason  # the watch loop stops the job with it
            return
        if found.ready:
            st.connection_known = True
            await self._record(JobStatusUpdate(
                job_id=inp.job_id, status=JobStatus.running,
                current_job_details=found.current_job_details, event="session ready",
            ))

    async def _connection_activity(self) -> ConnectionResult:
        inp, st = self._inp, self.state
        return await workflow.execute_activity_method(
            JobSteps.job_connection,
            ConnectionInput(job_id=inp.job_id, job_type=inp.job_type,
                            resource_name=inp.resource_name,
                            workdir=str(inp.job_details.get("workdir", "")),
                            hostname=st.hostname, job_details=inp.job_details,
                            user_id=inp.user_id),
            start_to_close_timeout=QUICK, retry_policy=RETRY_FOREVER,
        )

    async def _stop_if_idle(self, timeout_min: float) -> None:
        answer = await workflow.execute_activity_method(
            JobSteps.session_idle_seconds, IdleCheck(job_id=self._inp.job_id),
            start_to_close_timeout=QUICK, retry_policy=RETRY_FOREVER)
        idle = answer.seconds if isinstance(answer, IdleResult) else answer
        if idle >= timeout_min * 60 and not self.state.stop_requested:
            self.state.stop_requested = True
            self.state.stop_reason = f"Stopped after {timeout_min:g} minutes without activity."

    async def _stop(self) -> tuple[str, float, str]:
        inp, st = self._inp, self.state
        assert st.handle is not None
        if st.fail_reason:
            reason = st.fail_reason
        else:
            reason = st.stop_reason if st.stop_requested else "Time limit reached."
        await self._record(JobStatusUpdate(job_id=inp.job_id, status=JobStatus.stopping,
                                           event=reason))
        try:
            await workflow.execute_activity_method(
                JobSteps.stop_job, StopJobInput(resource_name=inp.resource_name,
                                                handle=st.handle),
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=RETRY_FOREVER, heartbeat_timeout=WATCH_HEARTBEAT,
            )
        except ActivityError as err:
            cause = permanent_reason(err)
            if cause is None:
                raise
            return JobStatus.failed, 0.0, f"{reason} The job could not be stopped: {cause}"
        final = await workflow.execute_activity_method(
            JobSteps.watch_job,
            WatchInput(resource_name=inp.resource_name, handle=st.handle, timeout_seconds=0.0,
                       known_status=""),
            start_to_close_timeout=QUICK, retry_policy=RETRY_FOREVER,
        )
        ended = JobStatus.failed if st.fail_reason else JobStatus.complete
        return ended, final.core_hours or 0.0, reason

    async def _finalize(self, status: str, core_hours: float, detail: str) -> None:
        inp = self._inp
        self.state.phase = "ended"
        end = FinalizeInput(job_id=inp.job_id, workspace_id=inp.workspace_id,
                            user_id=inp.user_id, status=status, core_hours=core_hours,
                            detail=detail)
        if workflow.patched(PATCH_LOCAL_RECORDS):
            await workflow.execute_local_activity_method(
                JobSteps.finalize_job, end,
                start_to_close_timeout=QUICK, retry_policy=RETRY_FOREVER)
        else:
            await workflow.execute_activity_method(
                JobSteps.finalize_job, end, start_to_close_timeout=QUICK,
                retry_policy=RETRY_FOREVER)
        self._set_status(status)
        # Work after the job's end never changes its outcome: a rescan that fails is left
        # to the usage upkeep schedule (its failure stays in this history).
        try:
            await workflow.execute_activity_method(
                WorkspaceSteps.scan_workspace, WorkspaceRef(workspace_id=inp.workspace_id),
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(minutes=1),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except ActivityError as err:
            workflow.logger.warning("rescan after job %s failed: %s", inp.job_id, err.cause)

    # --- helpers ----------------------------------------------------------------------

    @property
    def _inp(self) -> JobInput:
        if self.inp is None:
            raise ApplicationError("workflow input missing", non_retryable=True)
        return self.inp

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(lambda: self.state.stop_requested, timeout=seconds)

    def _remaining(self) -> float:
        return self.state.deadline_epoch - workflow.now().timestamp()

    def _pending_remaining(self) -> float:
        limit = self._inp.max_pending_min
        if not limit:
            return float("inf")
        return self.state.pending_since + limit * 60 - workflow.now().timestamp()

    def _still_pending(self) -> str:
        return f"Still pending after {self._inp.max_pending_min:g} minutes."

    def _time_limit_min(self) -> float:
        return self._inp.time_limit_min + self.state.extended_minutes

    def _set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            workflow.upsert_search_attributes([STATUS_KEY.value_set(status)])

    async def _record(self, update: JobStatusUpdate) -> None:
        self._set_status(update.status)
        if workflow.patched(PATCH_LOCAL_RECORDS):
            # One statement and a NOTIFY: no reason for a server round trip each time.
            await workflow.execute_local_activity_method(
                JobSteps.record_job_status, update,
                start_to_close_timeout=QUICK, retry_policy=RETRY_FOREVER,
            )
            return
        await workflow.execute_activity_method(
            JobSteps.record_job_status, update, start_to_close_timeout=QUICK,
            retry_policy=RETRY_FOREVER,
        )
