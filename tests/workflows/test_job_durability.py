"""Durable means it ends: ``JobWorkflow`` on the real dev server when a job can never
start, waits too long, is stopped while its launch is retried, outlives a failed rescan or
crosses continue-as-new with messages in flight. Histories are recorded for replay."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from app.worker import build_worker
from controllers.base import LaunchRequest, WorkspaceScan
from controllers.errors import BackendError, InvalidRequest
from controllers.resources.local import LocalResource
from controllers.resources.local.procfs import is_alive
from controllers.storage.local_fs import LocalFileSystemStorage
from db import quotas
from db.tables import Job
from tests.conftest import TEST_CONFIG, eventually
from tests.replay.recording import maybe_record
from tests.workflows.test_job_workflow import _job, _swap_resource
from workflows.job import JobWorkflow
from workflows.models import ExtendRequest, JobContinuation, JobInput, JobRunState, StopRequest

ROOT = Path(__file__).resolve().parents[2]


class RefusingResource(LocalResource):
    """A resource that judges the job and refuses it for good (Slurm: a bad partition)."""

    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        raise InvalidRequest("Slurm refused the job: Invalid partition name specified")


class UnreachableResource(LocalResource):
    """A resource that cannot be reached: every launch fails, each may pass next time."""

    launches = 0
    abandoned: list[int] = []

    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        type(self).launches += 1
        raise BackendError("Slurm cannot be reached.")

    async def abandon(self, job_id: int, workdir: str, account: Any) -> float:
        type(self).abandoned.append(job_id)
        return await super().abandon(job_id, workdir, account)


class LostAfterLaunchResource(LocalResource):
    """Launches for real, then never answers the first look: the start's workflow task
    never completes (``LOST_WORKER`` runs it in a worker the test then SIGKILLs)."""

    async def poll(self, handle: Any) -> Any:
        await asyncio.Event().wait()


# A worker process with LostAfterLaunchResource as its main resource.
LOST_WORKER = """
import asyncio
from app.controllers import load_controllers
from core.settings import get_settings
from core.temporal import connect
from db.engine import open_engine
from tests.workflows.test_job_durability import LostAfterLaunchResource
from tests.workflows.test_job_workflow import _swap_resource
from app.worker import build_worker

async def main():
    settings = get_settings()
    controllers, _ = _swap_resource(load_controllers(settings), LostAfterLaunchResource)
    await controllers.prepare()
    client = await connect(settings)
    await open_engine(settings.database_url)
    await build_worker(client, controllers, settings.task_queue).run()

asyncio.run(main())
"""


class BrokenScanStorage(LocalFileSystemStorage):
    async def scan(self, path: str) -> WorkspaceScan:
        raise OSError("the file server went away")


async def _start(client: Client, controllers, queue: str, *, resource: str | None = None,
                 reserve: float = 0.0, **fields: Any) -> tuple[WorkflowHandle, int, int]:
    user_id, ws, job_id, _ = await _job(controllers)
    if reserve:
        await quotas.reserve_core_hours(user_id, reserve, "test")
        await Job.update({Job.job_details: {"metrics": {"reserved_core_hours": reserve},
                                            "current_job_details": {}}}).where(Job.id == job_id)
    inp = JobInput(job_id=job_id, user_id=user_id, workspace_id=ws,
                   job_type="local_test_job",
                   resource_name=resource or controllers.config.main_resource,
                   time_limit_min=5, resource_options={"num_cpus": 1}, **fields)
    handle = await client.start_workflow(
        JobWorkflow.run, JobContinuation(inp=inp, state=JobRunState()),
        id=f"job-test-{uuid.uuid4()}", task_queue=queue)
    return handle, job_id, user_id


def _worker(client: Client, controllers, queue: str) -> Worker:
    return build_worker(client, controllers, queue)  # with the failure policy


async def _row(job_id: int) -> dict:
    row = await Job.select().where(Job.id == job_id).first()
    assert row is not None
    return row


async def test_launch_refused_for_good_fails_with_the_reason(temporal_env, controllers,
                                                             engine) -> None:
    swapped, _ = _swap_resource(controllers, RefusingResource)
    queue = f"durable-{uuid.uuid4()}"
    async with _worker(temporal_env.client, swapped, queue):
        handle, job_id, user_id = await _start(temporal_env.client, swapped, queue,
                                               reserve=2.0)
        assert await asyncio.wait_for(handle.result(), 60) == "failed"
        await maybe_record(handle, "job_launch_refused")
    row = await _row(job_id)
    assert row["status"] == "failed"
    assert "Slurm refused the job: Invalid partition name specified" in row["job_details"]
    assert (await quotas.view(user_id)).reserved_core_hours == 0  # released at the end
    assert row["core_hours"] == 0


async def test_resource_removed_from_the_config_fails_the_job(temporal_env, controllers,
                                                              engine) -> None:
    queue = f"durable-{uuid.uuid4()}"
    async with _worker(temporal_env.client, controllers, queue):
        handle, job_id, _ = await _start(temporal_env.client, controllers, queue,
                                         resource="gone_resource")
        assert await asyncio.wait_for(handle.result(), 60) == "failed"
    assert "The resource gone_resource is no longer configured." in \
        (await _row(job_id))["job_details"]


async def test_pending_past_its_limit_fails_and_shows_each_retry(temporal_env, controllers,
                                                                 engine) -> None:
    swapped, _ = _swap_resource(controllers, UnreachableResource)
    queue = f"durable-{uuid.uuid4()}"
    async with _worker(temporal_env.client, swapped, queue):
        handle, job_id, _ = await _start(temporal_env.client, swapped, queue,
                                         max_pending_min=0.1)

        async def shows_retry() -> bool:
            details = (await _row(job_id))["job_details"]
            return "launch attempt" in details and "Slurm cannot be reached." in details

        await eventually(shows_retry, timeout=30)
        assert await asyncio.wait_for(handle.result(), 60) == "failed"
        await maybe_record(handle, "job_pending_too_long")
    row = await _row(job_id)
    assert "Still pending after 0.1 minutes." in row["job_details"]
    assert job_id in UnreachableResource.abandoned  # whatever the launch began is ended


async def test_stop_wins_over_a_launch_being_retried(temporal_env, controllers,
                                                     engine) -> None:
    swapped, _ = _swap_resource(controllers, UnreachableResource)
    queue = f"durable-{uuid.uuid4()}"
    async with _worker(temporal_env.client, swapped, queue):
        before = UnreachableResource.launches
        handle, job_id, _ = await _start(temporal_env.client, swapped, queue)
        await eventually(lambda: asyncio.sleep(0, UnreachableResource.launches > before))
        await handle.signal(JobWorkflow.request_stop, StopRequest(reason="Stopped by user."))
        assert await asyncio.wait_for(handle.result(), 60) == "complete"
        await maybe_record(handle, "job_stopped_while_launching")
    row = await _row(job_id)
    assert "Stopped by user." in row["job_details"]
    assert job_id in UnreachableResource.abandoned


async def test_a_stop_while_a_lost_start_is_retried_ends_what_it_launched(
        temporal_env, controllers, engine, database_url, data_dir, tmp_path) -> None:
    """The worker running a job's start launches it and dies before its workflow task
    completes (a local activity leaves no trace in the history until then); the user
    stops the job meanwhile. The next worker sees the stop first: it must still end the
    process the lost attempt launched, and count what it used."""
    queue = f"durable-{uuid.uuid4()}"
    user_id, ws, job_id, _ = await _job(controllers)
    env = {**os.environ, "UWS_DATABASE_URL": database_url, "UWS_DATA_DIR": str(data_dir),
           "UWS_CONFIG": str(TEST_CONFIG), "UWS_TASK_QUEUE": queue, "PYTHONPATH": str(ROOT),
           "UWS_TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host}
    with (tmp_path / "lost-worker.log").open("wb") as log:
        lost = subprocess.Popen([sys.executable, "-c", LOST_WORKER], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    started = data_dir / "local-jobs" / str(job_id) / "started.json"
    try:
        inp = JobInput(job_id=job_id, user_id=user_id, workspace_id=ws,
                       job_type="local_test_job", time_limit_min=5,
                       resource_name=controllers.config.main_resource,
                       job_details={"duration_seconds": 600})
        handle = await temporal_env.client.start_workflow(
            JobWorkflow.run, JobContinuation(inp=inp, state=JobRunState()),
            id=f"job-test-{uuid.uuid4()}", task_queue=queue,
            task_timeout=timedelta(seconds=2))  # a lost task is retried soon
        await eventually(lambda: asyncio.sleep(0, started.exists()), timeout=60)
        await asyncio.sleep(1.5)  # it has been running for a while
    finally:
        lost.kill()
        lost.wait()
    record = json.loads(started.read_text())
    job = (record["job_pid"], record["job_ticks"])
    assert is_alive(*job)  # the worker is gone, not the job
    await handle.signal(JobWorkflow.request_stop, StopRequest(reason="Stopped by user."))
    async with _worker(temporal_env.client, controllers, queue):
        assert await asyncio.wait_for(handle.result(), 60) == "complete"
        await maybe_record(handle, "job_stopped_after_lost_start")
    assert not is_alive(*job)
    row = await _row(job_id)
    assert row["status"] == "complete"
    assert "Stopped by user." in row["job_details"]
    assert row["core_hours"] > 0  # it ran 1.5 s and more on one CPU


async def test_failed_rescan_never_changes_the_outcome(temporal_env, controllers,
                                                       engine) -> None:
    base = controllers.main_storage
    broken = BrokenScanStorage(base.name, base.settings)
    swapped = dataclasses.replace(controllers, storage={base.name: broken})
    queue = f"durable-{uuid.uuid4()}"
    async with _worker(temporal_env.client, swapped, queue):
        handle, job_id, _ = await _start(temporal_env.client, swapped, queue,
                                         job_details={"duration_seconds": 0.2})
        assert await asyncio.wait_for(handle.result(), 120) == "complete"
        described = await handle.describe()
    assert described.status.name == "COMPLETED"
    assert (await _row(job_id))["status"] == "complete"


async def test_continue_as_new_keeps_a_stop_and_an_extension(temporal_env, controllers,
                                                             engine) -> None:
    queue = f"durable-{uuid.uuid4()}"
    async with _worker(temporal_env.client, controllers, queue):
        # One watch chunk per run: the job is running from its first status write on,
        # and the extension cuts that chunk short, so the run continues as new.
        handle, job_id, _ = await _start(temporal_env.client, controllers, queue,
                                         loops_before_continue=1,
                                         job_details={"duration_seconds": 600})
        first_run = handle.result_run_id

        async def running() -> bool:
            return (await _row(job_id))["status"] == "running"

        await eventually(running, timeout=60)
        extended = await handle.execute_update(
            JobWorkflow.extend_time_limit, ExtendRequest(minutes=3, max_total_minutes=60))
        assert extended.time_limit_min == 8

        async def continued() -> bool:
            return (await handle.describe()).run_id != first_run

        await eventually(continued, timeout=60)
        snapshot = await handle.query(JobWorkflow.snapshot)
        assert snapshot.status == "running"  # the new run knows what the old one knew
        await handle.signal(JobWorkflow.request_stop, StopRequest(reason="Stopped by user."))
        assert await asyncio.wait_for(handle.result(), 60) == "complete"
        await maybe_record(handle, "job_continued_as_new")
    assert "Stopped by user." in (await _row(job_id))["job_details"]
