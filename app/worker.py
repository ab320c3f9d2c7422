"""The worker: controllers from config, then the Temporal worker (``uws worker``, or the
top-level ``worker.py``).

Every side effect of a workflow runs here, as an activity of one of the classes below,
built once with its dependencies injected.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.failure_policy import FailurePolicyInterceptor
from activities.jobs import JobActivities
from activities.shares import ShareActivities
from activities.upkeep import UpkeepActivities
from activities.workspaces import WorkspaceActivities
from app.controllers import load_controllers
from app.schedules import ensure_schedules
from app.worker_metrics import job_count_exporter, telemetry_runtime
from controllers.registry import Controllers
from core.logging_setup import configure_logging
from core.settings import Settings, get_settings
from core.temporal import connect, credentials_reloaded
from db.engine import close_engine, open_engine
from workflows.job import JobWorkflow
from workflows.share import ShareWorkspaceWorkflow
from workflows.upkeep import ReconcileJobsWorkflow, UsageUpkeepWorkflow
from workflows.workspace_delete import DeleteWorkspaceWorkflow
from workflows.workspace_scan import ScanWorkspaceWorkflow

log = logging.getLogger("uws.worker")

WORKFLOWS = [JobWorkflow, DeleteWorkspaceWorkflow, ScanWorkspaceWorkflow,
             ShareWorkspaceWorkflow, UsageUpkeepWorkflow, ReconcileJobsWorkflow]

def activities_for(controllers: Controllers, client: Client) -> list:
    return [*WorkspaceActivities(controllers).all(), *JobActivities(controllers).all(),
            *ShareActivities(controllers).all(), *UpkeepActivities(controllers, client).all()]


def build_worker(client: Client, controllers: Controllers, task_queue: str,
                 shutdown_seconds: float | None = None) -> Worker:
    if shutdown_seconds is None:
        shutdown_seconds = get_settings().worker_shutdown_seconds
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=activities_for(controllers, client),
        max_concurrent_activities=500,
        # Pollers: 20 each rather than the SDK's 5. bench/jobs_latency.py (--jobs 10
        # --concurrent 200 --hold 30 --window 5), 200 jobs started at once on 2 cores,
        # two runs each: start -> running p50 1.62 / 2.05 s with 5 pollers, 1.35 / 1.79 s
        # with 10, 1.18 / 1.12 s with 20 (p99 3.5-4.1 s in all); sequential starts the same
        # (0.036-0.039 s). Earlier, with five server round trips per start: 12.2 s with 5,
        # 9.0 s with 10.
        max_concurrent_workflow_task_polls=20, max_concurrent_activity_task_polls=20,
        # A deploy's SIGTERM lets running activities finish or heartbeat for this long
        # before they are cancelled (and retried elsewhere), instead of cutting them off.
        graceful_shutdown_timeout=timedelta(seconds=shutdown_seconds),
        interceptors=[FailurePolicyInterceptor()],
        # Our workflow modules hold constants only, so they are imported once rather than
        # for every new run: that re-import (compiling workflows/job.py) was a sixth of the
        # worker's CPU while 200 jobs started (py-spy). The sandbox's checks on calls
        # (clocks, randomness, I/O) still apply.
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules("workflows")),
    )


async def run_worker(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    controllers = load_controllers(settings)
    if not settings.database_url:
        raise RuntimeError("UWS_DATABASE_URL is not set (`uws worker` sets it for you)")
    await controllers.prepare()
    # Temporal first: a wrong certificate or key stops us before anything else opens.
    port = settings.worker_metrics_port
    client = await connect(settings, telemetry_runtime(port) if port is not None else None)
    engine = await open_engine(settings.database_url)
    try:
        await ensure_schedules(client, settings.task_queue, controllers.config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = build_worker(client, controllers, settings.task_queue,
                              settings.worker_shutdown_seconds)

        def take_new_connection() -> None:
            # Same client object, new connection under it: the worker's pollers move over.
            worker.client = client

        async with worker, job_count_exporter(settings.worker_job_metrics_port), \
                credentials_reloaded(client, on_reconnect=take_new_connection):
            log.info("worker polling task queue %r", settings.task_queue)
            await stop.wait()
            log.info("worker shutting down")
    finally:
        await close_engine(engine)


def main() -> None:
    configure_logging(get_settings().log_format)
    asyncio.run(run_worker())
