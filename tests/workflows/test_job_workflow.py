"""``JobWorkflow`` on the real dev server, with real processes through ``LocalResource``.

Test doubles subclass the real plugins: a resource that is unreachable for a while, one
whose first launch "crashes" after starting the process, a job type whose script fails.
Each run's history is recorded for the replay tests (``UWS_RECORD_HISTORIES=1``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey

from app.worker import build_worker
from controllers.base import JobContext, JobState, LaunchRequest, UserInfo
from controllers.job_types.local_test import LocalTestJob
from controllers.resources.local import LocalResource
from db.accounts import account_of, upsert_user
from db.tables import Job, Workspace
from tests.conftest import eventually
from tests.replay.recording import maybe_record
from workflows.job import JobWorkflow
from workflows.models import JobContinuation, JobInput, JobRunState, StopRequest


class FlakyResource(LocalResource):
    """Cannot be reached while ``unreachable`` is set, as a cluster behind a dead link."""

    unreachable = False
    unknown_answers = 0

    async def poll(self, handle: Any) -> JobState:
        if self.unreachable:
            self.unknown_answers += 1
            return JobState(status="unknown", detail="connection refused")
        return await super().poll(handle)

    async def wait(self, handle: Any, timeout: float) -> JobState:
        if self.unreachable:
            await asyncio.sleep(min(timeout, 0.2))
        else:
            await super().wait(handle, timeout)
        return await self.poll(handle)  # the link may have gone down while we waited


class CrashAfterLaunch(LocalResource):
    """The first launch starts the process, then dies before reporting it."""

    attempts = 0

    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        handle = await super().launch(request)
        type(self).attempts += 1
        if type(self).attempts == 1:
            raise RuntimeError("worker lost after the process started")
        return handle


class FailingJob(LocalTestJob):
    def script(self, ctx: JobContext) -> str:
        return "#!/bin/bash\necho about to fail\nexit 3\n"


def _swap_resource(controllers, cls):
    base = controllers.main_resource
    resource = cls(base.name, base.settings, storage=base.storage, auth=base.auth,
                   passthrough_domain=base.passthrough_domain,
                   parameter_mapping=base.parameter_mapping)
    return dataclasses.replace(controllers, resources={base.name: resource}), resource


def _with_failing_job(controllers):
    failing = FailingJob("failing_job", {})
    return dataclasses.replace(controllers,
                               job_types={**controllers.job_types, "failing_job": failing})


@pytest.fixture(autouse=True)
async def prepared(controllers) -> None:
    """What the worker does at start-up (the resource's state and sessions directories);
    these tests run their own workers, and may run before anything else prepared them."""
    await controllers.prepare()


async def _job(controllers, job_type: str = "local_test_job") -> tuple[int, int, int, Path]:
    """A user (with their own OS account, as a sign-in makes it), a workspace of theirs and
    a job row; the job's workdir."""
    storage = controllers.main_storage
    user_id = await upsert_user(UserInfo(username=f"wf{secrets.token_hex(4)}", email="w@x"))
    account = await account_of(user_id, controllers.storage_auth)
    ws = (await Workspace.insert(Workspace(user=user_id, name="wf", status="active",
                                           storage_name=storage.name))
          .returning(Workspace.id))[0]["id"]
    path = storage.workspace_path(account, ws)
    await Workspace.update({Workspace.file_path: path}).where(Workspace.id == ws)
    await storage.create_workspace(path, account)
    job = (await Job.insert(Job(user=user_id, workspace=ws, job_type=job_type,
                                resource_name=controllers.config.main_resource))
           .returning(Job.id))[0]["id"]
    return user_id, ws, job, Path(path) / ".jobs" / str(job)


async def _run(client: Client, controllers, *, job_type: str = "local_test_job",
               time_limit_min: float = 5, duration: float = 1.0, during=None,
               record_as: str | None = None) -> tuple[str, dict, Path]:
    user_id, ws, job_id, workdir = await _job(controllers, job_type)
    queue = f"job-test-{uuid.uuid4()}"
    inp = JobInput(job_id=job_id, user_id=user_id, workspace_id=ws, job_type=job_type,
                   resource_name=controllers.config.main_resource,
                   time_limit_min=time_limit_min, resource_options={"num_cpus": 2},
                   job_details={"duration_seconds": duration})
    async with build_worker(client, controllers, queue, shutdown_seconds=0):
        handle = await client.start_workflow(
            JobWorkflow.run, JobContinuation(inp=inp, state=JobRunState()),
            id=f"job-test-{uuid.uuid4()}", task_queue=queue)
        if during is not None:
            await during(handle, job_id)
        result = await handle.result()
        description = await handle.describe()
        if record_as:
            await maybe_record(handle, record_as)
    row = await Job.select().where(Job.id == job_id).first()
    assert description.typed_search_attributes.get(
        SearchAttributeKey.for_keyword("UwsStatus")) == result
    return result, row, workdir


async def _status_is(job_id: int, status: str) -> bool:
    row = await Job.select(Job.status).where(Job.id == job_id).first()
    return row["status"] == status


async def test_job_completes(temporal_env, controllers, engine) -> None:
    result, row, workdir = await _run(temporal_env.client, controllers, record_as="job_complete")
    assert result == "complete" and row["status"] == "complete", row["job_details"]
    assert row["resource_job_id"] > 0 and row["datetime_start"] and row["datetime_end"]
    assert 0 < row["core_hours"] < 2 * 30 / 3600  # 2 CPUs for about a second
    output = workdir / "test_job_output.txt"
    assert output.read_text().count("started") == 1
    # It ran as the user's own account, never as the worker's.
    account = await account_of(row["user"], controllers.storage_auth)
    assert output.stat().st_uid == account.uid not in (0, os.geteuid())


async def test_job_stopped_by_user(temporal_env, controllers, engine) -> None:
    async def stop(handle, job_id):
        await eventually(lambda: _status_is(job_id, "running"))
        await handle.signal(JobWorkflow.request_stop, StopRequest(reason="Stopped by user."))

    result, row, _ = await _run(temporal_env.client, controllers, duration=600, during=stop,
                                record_as="job_stopped")
    assert result == "complete", row["job_details"]
    assert row["datetime_end"] is not None


async def test_job_stopped_by_time_limit(temporal_env, controllers, engine) -> None:
    result, row, _ = await _run(temporal_env.client, controllers, duration=600,
                                time_limit_min=0.05, record_as="job_time_limit")
    assert result == "complete", row["job_details"]
    assert "Time limit reached." in row["job_details"]


async def test_failing_process(temporal_env, controllers, engine) -> None:
    result, row, _ = await _run(temporal_env.client, _with_failing_job(controllers),
                                job_type="failing_job", record_as="job_failed")
    assert result == "failed" and row["status"] == "failed"
    assert "exit code 3" in row["job_details"]


async def test_unreachable_resource_is_not_an_ended_job(temporal_env, controllers, engine) -> None:
    swapped, resource = _swap_resource(controllers, FlakyResource)

    async def cut_the_link(handle, job_id):
        await eventually(lambda: _status_is(job_id, "running"))
        resource.unreachable = True
        await asyncio.sleep(4)  # the 2 s job ends meanwhile, unseen
        assert await _status_is(job_id, "running")
        resource.unreachable = False

    result, row, _ = await _run(temporal_env.client, swapped, duration=2, during=cut_the_link,
                                record_as="job_unreachable")
    assert result == "complete" and row["status"] == "complete", row["job_details"]
    assert resource.unknown_answers > 0


async def test_launch_retried_after_crash_starts_one_process(
    temporal_env, controllers, engine
) -> None:
    swapped, _ = _swap_resource(controllers, CrashAfterLaunch)
    result, row, workdir = await _run(temporal_env.client, swapped,
                                      record_as="job_launch_retried")
    assert CrashAfterLaunch.attempts == 2
    assert result == "complete" and row["status"] == "complete", row["job_details"]
    assert (workdir / "test_job_output.txt").read_text().count("started") == 1


async def test_idle_session_is_stopped_with_its_reason(temporal_env, controllers, engine) -> None:
    user_id, ws, job_id, _ = await _job(controllers)
    queue = f"job-idle-{uuid.uuid4()}"
    inp = JobInput(job_id=job_id, user_id=user_id, workspace_id=ws, job_type="local_test_job",
                   resource_name=controllers.config.main_resource, time_limit_min=10,
                   job_details={"duration_seconds": 600}, idle_timeout_min=0.05)
    client = temporal_env.client
    async with build_worker(client, controllers, queue, shutdown_seconds=0):
        handle = await client.start_workflow(
            JobWorkflow.run, JobContinuation(inp=inp, state=JobRunState()),
            id=f"job-test-{uuid.uuid4()}", task_queue=queue)
        assert await handle.result() == "complete"
        await maybe_record(handle, "job_idle_stopped")
    row = await Job.select(Job.job_details).where(Job.id == job_id).first()
    assert "Stopped after 0.05 minutes without activity." in row["job_details"]
