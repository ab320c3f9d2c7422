"""Scheduled upkeep (run by Temporal Schedules, so operators can trigger or pause them):
usage totals recomputed from the database and storage, and job rows whose workflow is gone
marked failed with the reason."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.models import ReconcileResult, UpkeepInput, UsageResult
    from workflows.steps import UpkeepSteps

_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=1), maximum_attempts=5)


@workflow.defn
class UsageUpkeepWorkflow:
    @workflow.run
    async def run(self, inp: UpkeepInput) -> UsageResult:
        await workflow.execute_activity_method(
            UpkeepSteps.rescan_all_workspaces, inp, start_to_close_timeout=timedelta(hours=2),
            heartbeat_timeout=timedelta(minutes=2), retry_policy=_RETRY)
        return await workflow.execute_activity_method(
            UpkeepSteps.recompute_usage, inp,
            start_to_close_timeout=timedelta(minutes=10), retry_policy=_RETRY)


@workflow.defn
class ReconcileJobsWorkflow:
    @workflow.run
    async def run(self, inp: UpkeepInput) -> ReconcileResult:
        return await workflow.execute_activity_method(
            UpkeepSteps.reconcile_jobs, inp,
            start_to_close_timeout=timedelta(minutes=30), heartbeat_timeout=timedelta(minutes=2),
            retry_policy=_RETRY)
