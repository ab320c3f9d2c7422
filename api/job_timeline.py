"""A job's timeline, read from its workflow's history (every run of it, oldest first):
status changes, stop requests, extensions, retried steps with their errors, and the end."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from workflows.models import FinalizeInput, JobStatusUpdate, StartJobResult, job_workflow_id

T = TypeVar("T")
# How the SDK records a local activity in the history (its type and result inside).
LOCAL_ACTIVITY_MARKER = "core_local_activity"
_MAX_RUNS = 50  # continue-as-new chains longer than this are cut, newest kept


def _time(event: HistoryEvent) -> str:
    return event.event_time.ToDatetime().replace(tzinfo=None).isoformat() + "Z"


class _Reader:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._activity_names: dict[int, str] = {}

    def _decode(self, event: HistoryEvent, kind: type[T]) -> T | None:
        payloads = list(event.activity_task_scheduled_event_attributes.input.payloads)
        try:
            return self._client.data_converter.payload_converter.from_payloads(
                payloads, [kind])[0]
        except Exception:
            return None

    def _local_status(self, event: HistoryEvent, at: str) -> dict[str, Any] | None:
        """A status a local activity wrote (a status change or the end): its marker names
        the activity and holds what it returned, the write itself."""
        details = event.marker_recorded_event_attributes.details
        if event.marker_recorded_event_attributes.marker_name != LOCAL_ACTIVITY_MARKER \
                or "data" not in details or "result" not in details:
            return None
        try:
            data = json.loads(details["data"].payloads[0].data)
        except (ValueError, IndexError):
            return None
        kinds: dict[str, type] = {"record_job_status": JobStatusUpdate,
                                  "start_job": StartJobResult,
                                  "finalize_job": FinalizeInput}
        kind = kinds.get(data.get("activity_type", "")) if isinstance(data, dict) else None
        if kind is None:
            return None
        try:
            written = self._client.data_converter.payload_converter.from_payloads(
                list(details["result"].payloads), [kind])[0]
        except Exception:
            return None
        if isinstance(written, StartJobResult):
            written = written.written
        detail = written.event if isinstance(written, JobStatusUpdate) else written.detail
        return {"time": at, "type": "status", "status": written.status, "detail": detail}

    def entry(self, event: HistoryEvent) -> dict[str, Any] | None:
        kind = event.event_type
        at = _time(event)
        if kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            return self._local_status(event, at)
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            self._activity_names[event.event_id] = name
            if name == "record_job_status":
                update = self._decode(event, JobStatusUpdate)
                if update is not None:
                    return {"time": at, "type": "status", "status": update.status,
                            "detail": update.event}
            if name == "finalize_job":  # the end, with why ("Stopped by user.", the exit)
                end = self._decode(event, FinalizeInput)
                if end is not None:
                    return {"time": at, "type": "status", "status": end.status,
                            "detail": end.detail}
            return None
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attrs = event.activity_task_started_event_attributes
            if attrs.attempt > 1:
                return {"time": at, "type": "retry",
                        "step": self._activity_names.get(attrs.scheduled_event_id, "?"),
                        "attempt": attrs.attempt, "error": attrs.last_failure.message}
            return None
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            attrs = event.activity_task_failed_event_attributes
            return {"time": at, "type": "error",
                    "step": self._activity_names.get(attrs.scheduled_event_id, "?"),
                    "error": attrs.failure.message}
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            return {"time": at, "type": "signal",
                    "name": event.workflow_execution_signaled_event_attributes.signal_name}
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            return {"time": at, "type": "update", "name": request.input.name}
        simple = {
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: "workflow started",
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW: "workflow continued",
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED: "workflow completed",
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED: "workflow failed",
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED: "workflow terminated",
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT: "workflow timed out",
        }
        if kind in simple:
            return {"time": at, "type": "workflow", "detail": simple[kind]}
        return None


async def job_timeline(client: Client, job_id: int) -> list[dict[str, Any]] | None:
    """The timeline, or ``None`` when the job has no workflow (never started)."""
    reader = _Reader(client)
    runs: list[list[HistoryEvent]] = []
    run_id: str | None = None
    while len(runs) < _MAX_RUNS:
        handle = client.get_workflow_handle(job_workflow_id(job_id), run_id=run_id)
        try:
            history = await handle.fetch_history()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                break
            raise
        events = list(history.events)
        runs.append(events)
        previous = events[0].workflow_execution_started_event_attributes \
            .continued_execution_run_id if events else ""
        if not previous:
            break
        run_id = previous
    if not runs:
        return None
    timeline: list[dict[str, Any]] = []
    for events in reversed(runs):
        timeline.extend(e for e in (reader.entry(ev) for ev in events) if e is not None)
    timeline.extend(await _retrying_now(client, job_id))
    return timeline


async def _retrying_now(client: Client, job_id: int) -> list[dict[str, Any]]:
    """Steps being retried right now (a launch waiting on an unreachable resource): the
    history records an attempt only once it ends, the pending activity says why it waits."""
    try:
        described = await client.get_workflow_handle(job_workflow_id(job_id)).describe()
    except RPCError:
        return []
    found = []
    for pending in described.raw_description.pending_activities:
        if pending.attempt > 1 and pending.last_failure.message:
            found.append({
                "time": pending.last_attempt_complete_time.ToDatetime()
                .replace(tzinfo=None).isoformat() + "Z",
                "type": "retry", "step": pending.activity_type.name,
                "attempt": pending.attempt, "error": pending.last_failure.message,
            })
    return found
