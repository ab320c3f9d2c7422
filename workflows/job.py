"""``JobWorkflow``: one per job (id ``job-<id>``), from launch to its last core-hour.

prepare (script, job directory) → launch (idempotent: a retried launch finds the job it
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
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.workflow import ActivityCancellationType, ActivityHandle

with workflow.unsafe.imports_passed_through():
    from workflows.models import (
        AbandonInput,
        AbandonResult,
        ConnectionInput,
        ConnectionResult,
        ExtendRequest,
        ExtendResult,
        FinalizeInput,
        IdleCheck,
        JobContinuation,
        JobInput,
        JobSnapshot,
        JobStatusUpdate,
        LaunchInput,
        PrepareResult,
        StartJobInput,
        StartJobResult,
        StopJobInput,
        StopRequest,
        WatchInput,
        WatchResult,
        WorkspaceRef,
    )

STATUS_KEY = SearchAttributeKey.for_keyword("UwsStatus")

_QUICK = timedelta(seconds=30)
_RETRY_FOREVER = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)
# A watch returns at the latest after this long, so a stop or a deadline is never late
# by more than a signal's delivery, and histories grow by a few events per chunk.
_WATCH_CHUNK_SECONDS = 300.0
_MAX_UNKNOWN_BACKOFF = 60.0
# A watch heartbeats every few seconds; a worker that died mid-watch is noticed after this.
_WATCH_HEARTBEAT = timedelta(seconds=15)
_PATCH_EXTEND_RESTARTS_WATCH = "extend-restarts-watch"
# Prepare and launch race a stop request, the time limit and the pending limit, and a
# failure that no retry can cure ends the job; before, they were awaited to the end.
_PATCH_LAUNCH_RACES = "launch-races-stop-and-deadline"
# A job queued on the resource shows why (Slurm's Resources, Priority...) in its details
# and events, each time the reason changes.
_PATCH_PENDING_REASON = "pending-reason-shown"
# Prepare, launch and a first look at the launched job run as local activities, in the
# workflow task's own worker, and the first status (usually "running") is written once:
# one server round trip to running instead of five (bench/jobs_latency.py).
_PATCH_LOCAL_START = "local-start-steps"
_LOCAL_STEP = timedelta(minutes=5)
# Status writes and the final write as local activities too (the timeline reads them
# from their markers).
_PATCH_LOCAL_RECORDS = "local-status-records"
# Prepare, launch, the first look and the first status write as one local activity
# (``start_job``): each local activity costs the worker ~2 ms of CPU, which is what 200
# jobs started at once wait for (bench/jobs_latency.py).
_PATCH_ONE_START_STEP = "one-start-step"


def _permanent_reason(err: ActivityError | ApplicationError) -> str | None:
    """The user's message of a failure the activity marked as never curable (a local
    activity's failure arrives as that ApplicationError itself, not wrapped)."""
    for failure in (err, err.cause):
        if isinstance(failure, ApplicationError) and failure.non_retryable:
            return failure.message
    return None


def _idle_check_every(timeout_min: float) -> float:
    """How often an idle-stopping session is checked: a few times per timeout."""
    return min(max(timeout_min * 60 / 4, 1.0), 60.0)


@workflow.defn
class JobWorkflow:
    @workflow.init
    def __init__(self, cont: JobContinuation) -> None:
        # State comes from the input here, not in ``run``: a stop signal delivered with the
        # first task must find the state it belongs to, never be overwritten by it.
        self.inp: JobInput | None = cont.inp
        self.state = cont.state
        self.status = "pending"

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
        if self.status not in ("pending", "running") or self.state.stop_requested:
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
            self.status = "running" if st.hostname else "pending"

        if st.phase == "new":
            if workflow.patched(_PATCH_LAUNCH_RACES):
                await self._launch_racing()
            else:
                await self._launch()
        if st.phase == "launched":
            status, core_hours, detail = await self._watch()
        elif st.fail_reason:  # it never reached the resource, and never will
            status, core_hours, detail = "failed", st.abandoned_core_hours, st.fail_reason
        else:  # stopped (or out of time) before its launch was through
            status, core_hours = "complete", st.abandoned_core_hours
            detail = st.stop_reason or "Time limit reached."
        await self._finalize(status, core_hours, detail)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return status

    async def _launch(self) -> None:
        """Histories from before ``_PATCH_LAUNCH_RACES``: prepare and launch awaited."""
        inp, st = self._inp, self.state
        if st.stop_requested:
            return
        prep: PrepareResult = await workflow.execute_activity(
            "prepare_job", inp, result_type=PrepareResult,
            start_to_close_timeout=timedelta(minutes=5), retry_policy=_RETRY_FOREVER,
            heartbeat_timeout=_WATCH_HEARTBEAT,  # a killed worker's attempt: retried soon
        )
        if st.stop_requested:
            return
        handle: dict = await workflow.execute_activity(
            "launch_job",
            LaunchInput(
                job_id=inp.job_id, resource_name=inp.resource_name, workdir=prep.workdir,
                script=prep.script, resource_options=inp.resource_options, env=prep.env,
                time_limit_min=inp.time_limit_min, user_id=inp.user_id,
            ),
            result_type=dict,
            start_to_close_timeout=timedelta(minutes=5), retry_policy=_RETRY_FOREVER,
            # A worker killed mid-launch: retried after this, not after the whole timeout.
            heartbeat_timeout=_WATCH_HEARTBEAT,
        )
        await self._launched(handle, prep)

    async def _launch_racing(self) -> None:
        """Prepare and launch, each racing a stop request, the time limit and the pending
        limit. A failure no retry can cure ends the job with its reason; a launch given up
        with its outcome unknown is abandoned (whatever it started is ended)."""
        inp, st = self._inp, self.state
        if workflow.patched(_PATCH_ONE_START_STEP):
            await self._start_in_one_step()
            return
        if st.stop_requested:
            return
        local = workflow.patched(_PATCH_LOCAL_START)
        prep, interrupted = await self._unless_interrupted(
            workflow.start_local_activity(
                "prepare_job", inp, result_type=PrepareResult,
                start_to_close_timeout=_LOCAL_STEP, retry_policy=_RETRY_FOREVER,
            ) if local else workflow.start_activity(
                "prepare_job", inp, result_type=PrepareResult,
                start_to_close_timeout=timedelta(minutes=5), retry_policy=_RETRY_FOREVER,
                heartbeat_timeout=_WATCH_HEARTBEAT,
            ))
        if prep is None or interrupted:
            return
        launch = LaunchInput(
            job_id=inp.job_id, resource_name=inp.resource_name, workdir=prep.workdir,
            script=prep.script, resource_options=inp.resource_options, env=prep.env,
            time_limit_min=inp.time_limit_min, user_id=inp.user_id,
        )
        # A cancelled launch is abandoned only once its attempt has really ended. Run
        # locally, a launch is still idempotent: a worker that dies mid-launch leaves the
        # workflow task to another, whose retry finds the job the first one started.
        handle, interrupted = await self._unless_interrupted(
            workflow.start_local_activity(
                "launch_job", launch, result_type=dict,
                start_to_close_timeout=_LOCAL_STEP, retry_policy=_RETRY_FOREVER,
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            ) if local else workflow.start_activity(
                "launch_job", launch, result_type=dict,
                start_to_close_timeout=timedelta(minutes=5), retry_policy=_RETRY_FOREVER,
                heartbeat_timeout=_WATCH_HEARTBEAT,
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            ))
        if handle is None:
            await workflow.execute_activity(
                "abandon_launch",
                AbandonInput(job_id=inp.job_id, resource_name=inp.resource_name,
                             workdir=prep.workdir, user_id=inp.user_id),
                start_to_close_timeout=timedelta(minutes=2), retry_policy=_RETRY_FOREVER,
                heartbeat_timeout=_WATCH_HEARTBEAT,
            )
            return
        # Launched, even if a stop or a limit came meanwhile: the watch ends it properly.
        await self._launched(handle, prep, look_first=local)

    async def _start_in_one_step(self) -> None:
        """``start_job`` racing a stop request, the time limit and the pending limit, as
        prepare and launch did; given up, whatever it started is ended."""
        inp, st = self._inp, self.state
        abandon = AbandonInput(job_id=inp.job_id, resource_name=inp.resource_name,
                               workdir="", user_id=inp.user_id, workspace_id=inp.workspace_id)
        if st.stop_requested:
            # Stopped before its start. A local activity leaves no trace in the history
            # until its workflow task completes, so an attempt of this task by a worker
            # that died since may have launched the job all the same: end what it did.
            await self._abandon_launch(abandon)
            return
        started, interrupted = await self._unless_interrupted(workflow.start_local_activity(
            "start_job", StartJobInput(job=inp), result_type=StartJobResult,
            start_to_close_timeout=_LOCAL_STEP, retry_policy=_RETRY_FOREVER,
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        ))
        if started is None:
            # Failed for good, it launched nothing (every such failure comes before the
            # launch, or is the resource's refusal); cancelled, it may have.
            if interrupted:
                await self._abandon_launch(abandon)
            return
        # Launched, even if a stop or a limit came meanwhile: the watch ends it properly.
        st.handle = started.handle
        st.phase = "launched"
        st.hostname = started.hostname
        inp.job_details = {**inp.job_details, "workdir": started.workdir,
                           "interactive": started.interactive}
        self._set_status(started.written.status)

    async def _abandon_launch(self, abandon: AbandonInput) -> None:
        """End whatever a launch given up started; what it had used is still counted."""
        try:
            ended: AbandonResult = await workflow.execute_activity(
                "abandon_launch", abandon, result_type=AbandonResult,
                start_to_close_timeout=timedelta(minutes=2), retry_policy=_RETRY_FOREVER,
                heartbeat_timeout=_WATCH_HEARTBEAT,
            )
        except ActivityError as err:  # its resource is no longer configured, say
            reason = _permanent_reason(err)
            if reason is None:
                raise
            workflow.logger.warning("abandoning job %s's launch failed: %s",
                                    abandon.job_id, reason)
            return
        self.state.abandoned_core_hours = ended.core_hours

    async def _unless_interrupted(self, handle: ActivityHandle) -> tuple[Any, bool]:
        """(the activity's result or None, whether a stop or a limit came first). A failure
        no retry cures leaves its reason in ``fail_reason``; an interruption cancels the
        activity and still takes its result if it finished anyway."""
        st = self.state

        def done_or_stopped() -> bool:
            return handle.done() or st.stop_requested

        # Again after each timeout: an extension may have moved the deadline meanwhile.
        while not done_or_stopped():
            limit = min(self._remaining(), self._pending_remaining())
            if limit <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(done_or_stopped, timeout=limit)
        interrupted = not handle.done()
        if interrupted:
            if (not st.stop_requested and self._remaining() > 0
                    and self._pending_remaining() <= 0):
                st.fail_reason = self._still_pending()
            handle.cancel()
        try:
            return await handle, interrupted
        except (ActivityError, ApplicationError) as err:  # a local activity: the latter
            reason = _permanent_reason(err)
            if reason is not None and not st.fail_reason:
                st.fail_reason = reason
            return None, interrupted
        except asyncio.CancelledError:
            return None, interrupted

    async def _launched(self, handle: dict, prep: PrepareResult,
                        look_first: bool = False) -> None:
        inp, st = self._inp, self.state
        st.handle = handle
        st.phase = "launched"
        st.hostname = ""
        inp.job_details = {**inp.job_details, "workdir": prep.workdir,
                           "interactive": prep.interactive}
        resource_job_id = int(handle.get("id", -1))
        if look_first:
            # A local job is up by the time its launch returns: say "running" at once,
            # in the one write that also records the resource's job id.
            try:
                now: WatchResult | None = await workflow.execute_local_activity(
                    "watch_job",
                    WatchInput(resource_name=inp.resource_name, handle=handle,
                               timeout_seconds=0.0, known_status="pending",
                               deadline_epoch=st.deadline_epoch),
                    result_type=WatchResult, start_to_close_timeout=_QUICK,
                    retry_policy=_RETRY_FOREVER,
                )
            except (ActivityError, ApplicationError):
                now = None  # the watch that follows meets (and handles) the same failure
            if now is not None and now.status == "running":
                st.hostname = now.hostname or "127.0.0.1"
                await self._record(JobStatusUpdate(
                    job_id=inp.job_id, status="running", resource_job_id=resource_job_id,
                    set_start=True, event="running",
                ))
                return
        await self._record(JobStatusUpdate(
            job_id=inp.job_id, status="pending", resource_job_id=resource_job_id,
            event="launched",
        ))

    async def _watch(self) -> tuple[str, float, str]:
        inp, st = self._inp, self.state
        assert st.handle is not None
        connection_backoff = 1.0
        show_reason = workflow.patched(_PATCH_PENDING_REASON)
        for _ in range(inp.loops_before_continue):
            if self.status == "pending" and self._pending_remaining() <= 0 and not st.fail_reason:
                st.fail_reason = self._still_pending()
            if st.stop_requested or self._remaining() <= 0 or st.fail_reason:
                return await self._stop()
            chunk = min(self._remaining(), _WATCH_CHUNK_SECONDS)
            if self.status == "pending" and inp.max_pending_min:
                chunk = min(chunk, max(self._pending_remaining(), 0.001))
            if inp.idle_timeout_min and self.status == "running":
                chunk = min(chunk, _idle_check_every(inp.idle_timeout_min))
            if (self.status == "running" and not st.connection_known
                    and inp.job_details.get("interactive")):
                chunk = min(chunk, connection_backoff)
            known_reason = st.pending_reason if show_reason and self.status == "pending" else None
            result = await self._watch_once(chunk, known_reason)
            if result is None:  # interrupted by a stop request or the deadline
                continue
            if result.status in ("complete", "failed"):
                return result.status, result.core_hours or 0.0, result.detail
            if result.status == "unknown":
                st.unknown_streak += 1
                await self._record(JobStatusUpdate(
                    job_id=inp.job_id, status=self.status,
                    event=f"resource unreachable: {result.detail}",
                ))
                await self._sleep_unless_stopped(
                    min(2.0 ** st.unknown_streak, _MAX_UNKNOWN_BACKOFF))
                continue
            st.unknown_streak = 0
            if known_reason is not None and result.status == "pending" \
                    and result.detail != st.pending_reason:
                await self._show_pending_reason(result.detail)
            if result.status == "running" and self.status != "running":
                st.hostname = result.hostname or "127.0.0.1"
                # A reason shown while queued no longer holds.
                cleared = {"pending_reason": None} if st.pending_reason else None
                await self._record(JobStatusUpdate(
                    job_id=inp.job_id, status="running", set_start=True, event="running",
                    current_job_details=cleared,
                ))
            if (self.status == "running" and not st.connection_known
                    and inp.job_details.get("interactive")):
                connection_backoff = min(connection_backoff * 1.5, 10.0)
                await self._learn_connection()
            if inp.idle_timeout_min and self.status == "running":
                await self._stop_if_idle(inp.idle_timeout_min)
        # Bounded history: carry the whole state into a fresh run.
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(JobContinuation(inp=inp, state=st))

    async def _show_pending_reason(self, reason: str) -> None:
        self.state.pending_reason = reason
        await self._record(JobStatusUpdate(
            job_id=self._inp.job_id, status="pending",
            current_job_details={"pending_reason": reason or None},
            event=f"queued: {reason}" if reason else "queued",
        ))

    async def _watch_once(self, seconds: float,
                          known_reason: str | None = None) -> WatchResult | None:
        st = self.state
        assert st.handle is not None
        handle = workflow.start_activity(
            "watch_job",
            WatchInput(resource_name=self._inp.resource_name, handle=st.handle,
                       timeout_seconds=max(seconds, 0.0), known_status=self.status,
                       deadline_epoch=st.deadline_epoch, known_detail=known_reason),
            result_type=WatchResult,
            start_to_close_timeout=timedelta(seconds=seconds + 120),
            heartbeat_timeout=_WATCH_HEARTBEAT,
            retry_policy=_RETRY_FOREVER,
        )
        # An extension restarts the watch, whose activity then tells the resource (Slurm
        # would otherwise end the job at the limit it was submitted with). Histories from
        # before this behaviour replay without it.
        watched_deadline = st.deadline_epoch
        restart_on_extend = workflow.patched(_PATCH_EXTEND_RESTARTS_WATCH)

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
            reason = _permanent_reason(err)
            if reason is None:
                raise
            st.fail_reason = reason
            return WatchResult(status="failed", detail=reason)

    async def _learn_connection(self) -> None:
        inp, st = self._inp, self.state
        try:
            found: ConnectionResult = await self._connection_activity()
        except ActivityError as err:
            reason = _permanent_reason(err)
            if reason is None:
                raise
            st.fail_reason = reason  # the watch loop stops the job with it
            return
        if found.ready:
            st.connection_known = True
            await self._record(JobStatusUpdate(
                job_id=inp.job_id, status="running",
                current_job_details=found.current_job_details, event="session ready",
            ))

    async def _connection_activity(self) -> ConnectionResult:
        inp, st = self._inp, self.state
        return await workflow.execute_activity(
            "job_connection",
            ConnectionInput(job_id=inp.job_id, job_type=inp.job_type,
                            resource_name=inp.resource_name,
                            workdir=str(inp.job_details.get("workdir", "")),
                            hostname=st.hostname, job_details=inp.job_details,
                            user_id=inp.user_id),
            result_type=ConnectionResult,
            start_to_close_timeout=_QUICK, retry_policy=_RETRY_FOREVER,
        )

    async def _stop_if_idle(self, timeout_min: float) -> None:
        idle: float = await workflow.execute_activity(
            "session_idle_seconds", IdleCheck(job_id=self._inp.job_id), result_type=float,
            start_to_close_timeout=_QUICK, retry_policy=_RETRY_FOREVER)
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
        await self._record(JobStatusUpdate(job_id=inp.job_id, status="stopping", event=reason))
        try:
            await workflow.execute_activity(
                "stop_job", StopJobInput(resource_name=inp.resource_name, handle=st.handle),
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=_RETRY_FOREVER, heartbeat_timeout=_WATCH_HEARTBEAT,
            )
        except ActivityError as err:
            cause = _permanent_reason(err)
            if cause is None:
                raise
            return "failed", 0.0, f"{reason} The job could not be stopped: {cause}"
        final: WatchResult = await workflow.execute_activity(
            "watch_job",
            WatchInput(resource_name=inp.resource_name, handle=st.handle, timeout_seconds=0.0,
                       known_status=""),
            result_type=WatchResult,
            start_to_close_timeout=_QUICK, retry_policy=_RETRY_FOREVER,
        )
        return ("failed" if st.fail_reason else "complete"), final.core_hours or 0.0, reason

    async def _finalize(self, status: str, core_hours: float, detail: str) -> None:
        inp = self._inp
        self.state.phase = "ended"
        end = FinalizeInput(job_id=inp.job_id, workspace_id=inp.workspace_id,
                            user_id=inp.user_id, status=status, core_hours=core_hours,
                            detail=detail)
        if workflow.patched(_PATCH_LOCAL_RECORDS):
            await workflow.execute_local_activity(
                "finalize_job", end, result_type=FinalizeInput,
                start_to_close_timeout=_QUICK, retry_policy=_RETRY_FOREVER)
        else:
            await workflow.execute_activity(
                "finalize_job", end, start_to_close_timeout=_QUICK,
                retry_policy=_RETRY_FOREVER)
        self._set_status(status)
        # Work after the job's end never changes its outcome: a rescan that fails is left
        # to the usage upkeep schedule (its failure stays in this history).
        try:
            await workflow.execute_activity(
                "scan_workspace", WorkspaceRef(workspace_id=inp.workspace_id),
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
        if workflow.patched(_PATCH_LOCAL_RECORDS):
            # One statement and a NOTIFY: no reason for a server round trip each time.
            await workflow.execute_local_activity(
                "record_job_status", update, result_type=JobStatusUpdate,
                start_to_close_timeout=_QUICK, retry_policy=_RETRY_FOREVER,
            )
            return
        await workflow.execute_activity(
            "record_job_status", update, start_to_close_timeout=_QUICK,
            retry_policy=_RETRY_FOREVER,
        )
