"""How ``JobWorkflow`` gets a job onto its resource: today in one local activity
(``start_job``), and the older ways kept for the histories that took them (a workflow
replays through the path its history recorded; ``workflow.patched`` tells which).

Every way races a stop request, the time limit and the pending limit. A failure no retry
can cure ends the job with its reason; a start given up with its outcome unknown is
abandoned: whatever it started is ended, and what that used is still counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.workflow import ActivityCancellationType, ActivityHandle

with workflow.unsafe.imports_passed_through():
    from core.status import JobStatus, ResourceStatus
    from workflows.job_options import (
        ABANDON_STEP,
        LOCAL_STEP,
        PATCH_LOCAL_START,
        PATCH_ONE_START_STEP,
        QUICK,
        RESOURCE_STEP,
        RETRY_FOREVER,
        WATCH_HEARTBEAT,
        permanent_reason,
    )
    from workflows.models import (
        AbandonInput,
        JobHandle,
        JobInput,
        JobRunState,
        JobStatusUpdate,
        LaunchInput,
        PrepareResult,
        StartJobInput,
        WatchInput,
        WatchResult,
    )
    from workflows.steps import JobSteps


class JobStart:
    """The start of ``JobWorkflow`` (a mixin: the state and its helpers are the
    workflow's own, declared here for the type checker)."""

    state: JobRunState

    @property
    def _inp(self) -> JobInput:
        raise NotImplementedError

    def _remaining(self) -> float:
        raise NotImplementedError

    def _pending_remaining(self) -> float:
        raise NotImplementedError

    def _still_pending(self) -> str:
        raise NotImplementedError

    def _set_status(self, status: str) -> None:
        raise NotImplementedError

    async def _record(self, update: JobStatusUpdate) -> None:
        raise NotImplementedError

    # --- today: one local activity ---------------------------------------------------------

    async def _start_in_one_step(self) -> None:
        """``start_job``, racing a stop request and the limits."""
        inp, st = self._inp, self.state
        abandon = AbandonInput(job_id=inp.job_id, resource_name=inp.resource_name,
                               workdir="", user_id=inp.user_id, workspace_id=inp.workspace_id)
        if st.stop_requested:
            # Stopped before its start. A local activity leaves no trace in the history
            # until its workflow task completes, so an attempt of this task by a worker
            # that died since may have launched the job all the same: end what it did.
            await self._abandon_launch(abandon)
            return
        started, interrupted = await self._unless_interrupted(
            workflow.start_local_activity_method(
                JobSteps.start_job, StartJobInput(job=inp),
                start_to_close_timeout=LOCAL_STEP, retry_policy=RETRY_FOREVER,
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
        """End whatever a start given up began; what it had used is still counted."""
        try:
            ended = await workflow.execute_activity_method(
                JobSteps.abandon_launch, abandon,
                start_to_close_timeout=ABANDON_STEP, retry_policy=RETRY_FOREVER,
                heartbeat_timeout=WATCH_HEARTBEAT,
            )
        except ActivityError as err:  # its resource is no longer configured, say
            reason = permanent_reason(err)
            if reason is None:
                raise
            workflow.logger.warning("abandoning job %s's launch failed: %s",
                                    abandon.job_id, reason)
            return
        if ended is not None:  # None: an abandon recorded before it told what was used
            self.state.abandoned_core_hours = ended.core_hours

    async def _unless_interrupted(self, handle: ActivityHandle[Any]) -> tuple[Any, bool]:
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
            reason = permanent_reason(err)
            if reason is not None and not st.fail_reason:
                st.fail_reason = reason
            return None, interrupted
        except asyncio.CancelledError:
            return None, interrupted

    # --- before one-start-step: prepare and launch as steps of their own -----------------

    async def _launch_racing(self) -> None:
        """Prepare, then launch, each racing a stop request and the limits (local
        activities from ``local-start-steps`` on, else activities)."""
        inp, st = self._inp, self.state
        if workflow.patched(PATCH_ONE_START_STEP):
            await self._start_in_one_step()
            return
        if st.stop_requested:
            return
        local = workflow.patched(PATCH_LOCAL_START)
        prep: PrepareResult | None
        prep, interrupted = await self._unless_interrupted(
            workflow.start_local_activity_method(
                JobSteps.prepare_job, inp,
                start_to_close_timeout=LOCAL_STEP, retry_policy=RETRY_FOREVER,
            ) if local else workflow.start_activity_method(
                JobSteps.prepare_job, inp,
                start_to_close_timeout=RESOURCE_STEP, retry_policy=RETRY_FOREVER,
                heartbeat_timeout=WATCH_HEARTBEAT,
            ))
        if prep is None or interrupted:
            return
        launch = _launch_input(inp, prep)
        # A cancelled launch is abandoned only once its attempt has really ended. Run
        # locally, a launch is still idempotent: a worker that dies mid-launch leaves the
        # workflow task to another, whose retry finds the job the first one started.
        handle: JobHandle | None
        handle, interrupted = await self._unless_interrupted(
            workflow.start_local_activity_method(
                JobSteps.launch_job, launch,
                start_to_close_timeout=LOCAL_STEP, retry_policy=RETRY_FOREVER,
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            ) if local else workflow.start_activity_method(
                JobSteps.launch_job, launch,
                start_to_close_timeout=RESOURCE_STEP, retry_policy=RETRY_FOREVER,
                heartbeat_timeout=WATCH_HEARTBEAT,
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            ))
        if handle is None:
            # Its result was not needed (before one-start-step, core-hours were not kept).
            await workflow.execute_activity_method(
                JobSteps.abandon_launch,
                AbandonInput(job_id=inp.job_id, resource_name=inp.resource_name,
                             workdir=prep.workdir, user_id=inp.user_id),
                start_to_close_timeout=ABANDON_STEP, retry_policy=RETRY_FOREVER,
                heartbeat_timeout=WATCH_HEARTBEAT,
            )
            return
        # Launched, even if a stop or a limit came meanwhile: the watch ends it properly.
        await self._launched(handle, prep, look_first=local)

    async def _launch(self) -> None:
        """Before ``launch-races-stop-and-deadline``: prepare and launch awaited."""
        inp, st = self._inp, self.state
        if st.stop_requested:
            return
        prep = await workflow.execute_activity_method(
            JobSteps.prepare_job, inp,
            start_to_close_timeout=RESOURCE_STEP, retry_policy=RETRY_FOREVER,
            heartbeat_timeout=WATCH_HEARTBEAT,  # a killed worker's attempt: retried soon
        )
        if st.stop_requested:
            return
        handle = await workflow.execute_activity_method(
            JobSteps.launch_job, _launch_input(inp, prep),
            start_to_close_timeout=RESOURCE_STEP, retry_policy=RETRY_FOREVER,
            # A worker killed mid-launch: retried after this, not after the whole timeout.
            heartbeat_timeout=WATCH_HEARTBEAT,
        )
        await self._launched(handle, prep)

    async def _launched(self, handle: JobHandle, prep: PrepareResult,
                        look_first: bool = False) -> None:
        """The state of a launched job, and its first status (after a first look, with
        ``local-start-steps``: a local job is up by the time its launch returns)."""
        inp, st = self._inp, self.state
        st.handle = handle
        st.phase = "launched"
        st.hostname = ""
        inp.job_details = {**inp.job_details, "workdir": prep.workdir,
                           "interactive": prep.interactive}
        if look_first:
            try:
                now: WatchResult | None = await workflow.execute_local_activity_method(
                    JobSteps.watch_job,
                    WatchInput(resource_name=inp.resource_name, handle=handle,
                               timeout_seconds=0.0, known_status=JobStatus.pending,
                               deadline_epoch=st.deadline_epoch),
                    start_to_close_timeout=QUICK, retry_policy=RETRY_FOREVER,
                )
            except (ActivityError, ApplicationError):
                now = None  # the watch that follows meets (and handles) the same failure
            if now is not None and now.status == ResourceStatus.running:
                st.hostname = now.hostname or "127.0.0.1"
                await self._record(JobStatusUpdate(
                    job_id=inp.job_id, status=JobStatus.running, resource_job_id=handle.id,
                    set_start=True, event="running",
                ))
                return
        await self._record(JobStatusUpdate(
            job_id=inp.job_id, status=JobStatus.pending, resource_job_id=handle.id,
            event="launched",
        ))


def _launch_input(inp: JobInput, prep: PrepareResult) -> LaunchInput:
    return LaunchInput(
        job_id=inp.job_id, resource_name=inp.resource_name, workdir=prep.workdir,
        script=prep.script, resource_options=inp.resource_options, env=prep.env,
        time_limit_min=inp.time_limit_min, user_id=inp.user_id,
    )
