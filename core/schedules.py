"""Temporal Schedules for the upkeep workflows, created at worker start-up if missing.

Operators see, trigger and pause them in the Temporal UI (Schedules tab)."""

from __future__ import annotations

import logging
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
            pass  # kept as is: an operator may have paused or tuned it
