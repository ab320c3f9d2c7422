"""A worker SIGKILLed while jobs run: a new worker takes over, every job ends correctly,
none is launched twice. The worker runs as a separate process (``uws worker``)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from db.tables import Job
from tests.conftest import TEST_CONFIG, eventually
from tests.workflows.test_job_workflow import _job
from workflows.job import JobWorkflow
from workflows.models import JobContinuation, JobInput, JobRunState, StopRequest

ROOT = Path(__file__).resolve().parents[2]


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _start_worker(temporal_env, database_url: str, data_dir: Path, queue: str,
                  log: Path) -> subprocess.Popen:
    env = {**os.environ, "UWS_DATABASE_URL": database_url, "UWS_DATA_DIR": str(data_dir),
           "UWS_CONFIG": str(TEST_CONFIG), "UWS_TASK_QUEUE": queue,
           "UWS_TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, cwd=ROOT,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


@pytest.mark.slow
async def test_sigkill_worker_while_jobs_run(
    temporal_env, controllers, engine, database_url, data_dir, tmp_path
) -> None:
    client = temporal_env.client
    queue = f"kill-{uuid.uuid4()}"
    log = tmp_path / "worker.log"
    worker = _start_worker(temporal_env, database_url, data_dir, queue, log)
    jobs = []
    try:
        for _ in range(4):
            user_id, ws, job_id, workdir = await _job(controllers)
            inp = JobInput(job_id=job_id, user_id=user_id, workspace_id=ws,
                           job_type="local_test_job",
                           resource_name=controllers.config.main_resource, time_limit_min=10,
                           job_details={"duration_seconds": 8})
            handle = await client.start_workflow(
                JobWorkflow.run, JobContinuation(inp=inp, state=JobRunState()),
                id=f"kill-test-{job_id}-{uuid.uuid4().hex[:6]}", task_queue=queue)
            jobs.append((job_id, workdir, handle))

        async def all_running() -> bool:
            rows = await Job.select(Job.status).where(Job.id.is_in([j[0] for j in jobs]))
            return all(r["status"] == "running" for r in rows)

        await eventually(all_running, timeout=60)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        # The jobs are the supervisors', not the worker's: they run on without it, as
        # their owners' accounts.
        rows = await Job.select(Job.resource_job_id).where(Job.id.is_in([j[0] for j in jobs]))
        for row in rows:
            pid = row["resource_job_id"]
            assert _is_running(pid), pid
            assert Path(f"/proc/{pid}").stat().st_uid not in (0, os.geteuid())
        # While no worker runs: a stop request waits in the workflow's history.
        await jobs[0][2].signal(JobWorkflow.request_stop, StopRequest(reason="Stopped by user."))
        await asyncio.sleep(1)
        worker = _start_worker(temporal_env, database_url, data_dir, queue, log)
        results = await asyncio.wait_for(
            asyncio.gather(*(h.result() for _, _, h in jobs)), timeout=120)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert results == ["complete"] * len(jobs), log.read_text()[-3000:]
    for job_id, workdir, _ in jobs:
        row = await Job.select(Job.status, Job.core_hours).where(Job.id == job_id).first()
        assert row["status"] == "complete"
        assert row["core_hours"] > 0
        assert (workdir / "test_job_output.txt").read_text().count("started") == 1, job_id
