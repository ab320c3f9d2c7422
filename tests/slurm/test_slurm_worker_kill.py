"""A worker (a separate ``uws worker`` process) SIGKILLed between submitting a Slurm job
and reporting the submission: the retried launch on a new worker finds that job, so
exactly one Slurm job exists and the UWS job ends correctly with it."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType

from app.stack import Child
from controllers.resources.slurm.resource import PAUSE_AFTER_SUBMIT_ENV
from db.tables import Job, Workspace
from tests.conftest import eventually
from tests.slurm.conftest import slurm_env, slurm_jobs_named, uws_worker
from workflows.job import JobWorkflow
from workflows.models import JobContinuation, JobInput, JobRunState


def _worker(temporal_env, settings, queue: str, log: Path,
            pause: float | None) -> Child:
    env = {**slurm_env(temporal_env, settings), "UWS_TASK_QUEUE": queue}
    if pause is not None:
        # Holds the launch activity after slurmrestd accepted the job, before it returns.
        env[PAUSE_AFTER_SUBMIT_ENV] = str(pause)
    return uws_worker(env, log)


@pytest.mark.slow
async def test_sigkill_worker_mid_submit(temporal_env, slurm_settings, slurm_client,
                                         slurm_user, slurm_rest, slurm_root) -> None:
    from tests.slurm.conftest import record_history

    r = await slurm_client.post("/workspaces/", headers=slurm_user.headers,
                                json={"name": "kill", "description": "kill"})
    ws = r.json()["data"]["workspace"]
    row = await Workspace.select(Workspace.user).where(Workspace.id == ws["id"]).first()
    job_id = (await Job.insert(Job(user=row["user"], workspace=ws["id"],
                                   job_type="batch_script", resource_name="slurm_resource"))
              .returning(Job.id))[0]["id"]
    queue = f"slurm-kill-{uuid.uuid4()}"
    log = slurm_root / f"worker-{job_id}.log"
    worker = _worker(temporal_env, slurm_settings, queue, log, pause=600)
    try:
        inp = JobInput(job_id=job_id, user_id=row["user"], workspace_id=ws["id"],
                       job_type="batch_script", resource_name="slurm_resource",
                       time_limit_min=5, job_details={"script": "sleep 2\n"})
        handle = await temporal_env.client.start_workflow(
            JobWorkflow.run, JobContinuation(inp=inp, state=JobRunState()),
            id=f"job-{job_id}", task_queue=queue)
        name = f"uws-{job_id}"
        await eventually(lambda: slurm_jobs_named(slurm_rest, name), timeout=90, interval=0.2)
        worker.kill()
        worker = _worker(temporal_env, slurm_settings, queue, log, pause=None)
        result = await asyncio.wait_for(handle.result(), timeout=120)
    finally:
        worker.stop(timeout=30)
    assert result == "complete", log.read_text()[-3000:]
    submitted = await slurm_jobs_named(slurm_rest, name)
    assert len(submitted) == 1, submitted
    job = await Job.select(Job.status, Job.resource_job_id, Job.core_hours) \
        .where(Job.id == job_id).first()
    assert job["status"] == "complete"
    assert job["resource_job_id"] == submitted[0]["job_id"]
    assert job["core_hours"] > 0
    # The start (prepare, launch, first look) runs as one local activity inside the
    # workflow task: the killed worker's task timed out, the next worker ran the start
    # again, and its launch found the job the first one had submitted (one Slurm job
    # above); one start is recorded.
    history = await handle.fetch_history()
    launches = [e for e in history.events if _local_activity(e) == "start_job"]
    assert len(launches) == 1
    timed_out = [e.event_id for e in history.events
                 if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT]
    assert timed_out and timed_out[0] < launches[0].event_id, timed_out
    await record_history(temporal_env, job_id, "slurm_launch_retried", slurm_root)


def _local_activity(event) -> str | None:
    """The activity type a local-activity marker records, ``None`` for other events."""
    if event.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
        return None
    details = event.marker_recorded_event_attributes.details
    if "data" not in details:
        return None
    return json.loads(details["data"].payloads[0].data).get("activity_type")
