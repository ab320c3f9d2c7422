"""Temporal Schedules for the upkeep workflows, created at worker start-up if missing and
updated when their settings (interval, task queue) changed.

Operators see, trigger and pause them in the Temporal UI (Schedules tab); an update
replaces only what the settings decide, so a pause, its note and a tuned policy stay."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from core.config import AppConfig
from workflows.models import UpkeepInput
from workflows.upkeep import ReconcileJobsWorkflow, UsageUpkeepWorkflow

log = logging.getLogger("uws.schedules")

USAGE_SCHEDULE = "uws-usage-upkeep"
RECONCILE_SCHEDULE = "uws-job-reconcile"


def _schedule(workflow: object, workflow_id: str, task_queue: str, minutes: float) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(workflow, UpkeepInput(), id=workflow_id,  # type: ignore[arg-type]
                                           task_queue=task_queue),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(minutes=minutes))]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def ensure_schedules(client: Client, task_queue: str, config: AppConfig,
                           prefix: str = "") -> None:
    wanted = {
        prefix + USAGE_SCHEDULE: _schedule(UsageUpkeepWorkflow.run, prefix + "uws-usage",
                                           task_queue, config.upkeep.usage_interval_minutes),
        prefix + RECONCILE_SCHEDULE: _schedule(ReconcileJobsWorkflow.run,
                                               prefix + "uws-reconcile", task_queue,
                                               config.upkeep.reconcile_interval_minutes),
    }
    for schedule_id, schedule in wanted.items():
        try:
            await client.create_schedule(schedule_id, schedule)
            log.info("created schedule %s", schedule_id)
        except ScheduleAlreadyRunningError:
            await client.get_schedule_handle(schedule_id).update(_updater(schedule_id, schedule))


def _settings_of(schedule: Schedule) -> tuple[object, ...]:
    """What of a schedule our settings decide: its intervals and the workflow it starts."""
    spec, action = schedule.spec, schedule.action
    started = ((action.workflow, action.id, action.task_queue)
               if isinstance(action, ScheduleActionStartWorkflow) else None)
    return ([(i.every, i.offset or timedelta()) for i in spec.intervals],
            list(spec.calendars), list(spec.cron_expressions), started)


def _updater(schedule_id: str,
             wanted: Schedule) -> Callable[[ScheduleUpdateInput], ScheduleUpdate | None]:
    def update(inp: ScheduleUpdateInput) -> ScheduleUpdate | None:
        current = inp.description.schedule
        if _settings_of(current) == _settings_of(wanted):
            return None  # nothing changed: no write
        # Only spec and action are ours; state (an operator's pause and its note) and
        # policy are carried over from what the server holds.
        current.spec = wanted.spec
        current.action = wanted.action
        log.info("updated schedule %s", schedule_id)
        return ScheduleUpdate(schedule=current)

    return update
