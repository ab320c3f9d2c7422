"""ScanWorkspaceWorkflow on a real worker (rescans coalesced, a run crossing
continue-as-new, a workspace it can never scan) and the upkeep workflows; their histories
feed the replay corpus (``UWS_RECORD_HISTORIES=1``). Also what the worker does at start-up
and shutdown: the upkeep schedules follow the config and keep an operator's pause, and
running activities get time to finish."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import (
    Client,
    ScheduleActionStartWorkflow,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.failure_policy import FailurePolicyInterceptor
from activities.workspaces import WorkspaceActivities
from api.workflow_ops import request_scan
from app.schedules import RECONCILE_SCHEDULE, USAGE_SCHEDULE, ensure_schedules
from app.worker import WORKFLOWS, activities_for, build_worker
from controllers.base import UserInfo
from core.settings import Settings
from db import quotas
from db.accounts import account_of, upsert_user
from db.tables import Job, UserQuota, Workspace
from tests.replay.recording import maybe_record
from workflows import workspace_scan
from workflows.models import (
    ScanRequest,
    ScanResult,
    ScanWorkspaceInput,
    UpkeepInput,
    WorkspaceRef,
    scan_workflow_id,
)
from workflows.upkeep import ReconcileJobsWorkflow, UsageUpkeepWorkflow
from workflows.workspace_scan import ScanWorkspaceWorkflow

WAIT = 30.0


@pytest.fixture(autouse=True)
async def prepared(controllers) -> None:
    """What the worker does at start-up; these tests run their own workers."""
    await controllers.prepare()


async def _workspace(controllers, files: tuple[str, ...] = ("a.txt", "b.txt")) -> int:
    """A user's workspace with its directory and ``files`` in it."""
    storage = controllers.main_storage
    user_id = await upsert_user(UserInfo(username=f"sc{secrets.token_hex(4)}", email="s@x"))
    account = await account_of(user_id, controllers.storage_auth)
    ws = (await Workspace.insert(Workspace(user=user_id, name="scan", status="idle",
                                           storage_name=storage.name))
          .returning(Workspace.id))[0]["id"]
    path = storage.workspace_path(account, ws)
    await Workspace.update({Workspace.file_path: path}).where(Workspace.id == ws)
    await storage.create_workspace(path, account)
    for name in files:
        (Path(path) / name).write_bytes(b"x" * 1000)
    return ws


class GatedScans:
    """The real ``scan_workspace`` activity, each call held until the test releases it, so
    signals can be sent while a scan is known to run."""

    def __init__(self, controllers) -> None:
        self._real = WorkspaceActivities(controllers)
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self._permits = asyncio.Semaphore(0)

    @activity.defn(name="scan_workspace")
    async def scan_workspace(self, ref: WorkspaceRef) -> ScanResult:
        self.started.put_nowait(ref.workspace_id)
        await self._permits.acquire()
        return await self._real.scan_workspace(ref)

    async def next_scan(self) -> int:
        return await asyncio.wait_for(self.started.get(), WAIT)

    def release(self) -> None:
        self._permits.release()


async def _signals_in_history(handle: WorkflowHandle, count: int) -> None:
    """Wait until the run's history holds ``count`` rescan signals."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        history = await handle.fetch_history()
        seen = sum(1 for e in history.events
                   if e.HasField("workflow_execution_signaled_event_attributes"))
        if seen >= count:
            assert seen == count
            return
        assert asyncio.get_running_loop().time() < deadline, f"{seen} of {count} signals"
        await asyncio.sleep(0.05)


def _scan_worker(client: Client, queue: str, gated: GatedScans) -> Worker:
    return Worker(client, task_queue=queue, workflows=WORKFLOWS,
                  activities=[gated.scan_workspace], interceptors=[FailurePolicyInterceptor()])


# --- the scan workflow ---------------------------------------------------------------------


async def test_rescans_requested_during_a_scan_coalesce_into_one(
    temporal_env, controllers, engine
) -> None:
    client = temporal_env.client
    ws = await _workspace(controllers)
    queue = f"scan-{uuid.uuid4()}"
    gated = GatedScans(controllers)
    handle = client.get_workflow_handle_for(ScanWorkspaceWorkflow.run, scan_workflow_id(ws))
    async with _scan_worker(client, queue, gated):
        await request_scan(client, queue, ws, "created")  # what the API does
        assert await gated.next_scan() == ws
        for reason in ("updated", "uploaded", "uploaded"):
            await request_scan(client, queue, ws, reason)
        await _signals_in_history(handle, 4)
        gated.release()
        assert await gated.next_scan() == ws  # three requests, one more scan
        gated.release()
        result = await asyncio.wait_for(handle.result(), WAIT)
    assert result.scans == 2
    assert [(r.found, r.files, r.disk_space) for r in result.results] == [(True, 2, 2000)] * 2
    row = await Workspace.select(Workspace.disk_space).where(Workspace.id == ws).first()
    assert row["disk_space"] == 2000
    await maybe_record(handle, "scan_coalesced")


async def test_a_rescan_in_flight_at_the_bound_carries_over_continue_as_new(
    temporal_env, controllers, engine
) -> None:
    client = temporal_env.client
    ws = await _workspace(controllers)
    queue = f"scan-{uuid.uuid4()}"
    gated = GatedScans(controllers)
    async with _scan_worker(client, queue, gated):
        first = await client.start_workflow(
            ScanWorkspaceWorkflow.run, ScanWorkspaceInput(workspace_id=ws, max_scans=2),
            id=scan_workflow_id(ws), task_queue=queue,
            start_signal="rescan", start_signal_args=[ScanRequest(reason="created")])
        assert await gated.next_scan() == ws
        await request_scan(client, queue, ws, "updated")
        await _signals_in_history(first, 2)
        gated.release()
        assert await gated.next_scan() == ws  # the second, and last, scan of this run
        await request_scan(client, queue, ws, "uploaded")  # in flight at the bound
        await _signals_in_history(first, 3)
        gated.release()
        assert await gated.next_scan() == ws  # done by the next run
        gated.release()
        result = await asyncio.wait_for(first.result(), WAIT)  # follows the new run
    assert result.scans == 1 and result.results[0].files == 2
    run = client.get_workflow_handle(scan_workflow_id(ws), run_id=first.first_execution_run_id)
    assert (await run.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW
    history = await run.fetch_history()
    carried = history.events[-1].workflow_execution_continued_as_new_event_attributes
    assert carried.new_execution_run_id, history.events[-1]
    await maybe_record(run, "scan_continued_as_new")


async def test_a_workspace_that_can_never_be_scanned_ends_the_workflow(
    temporal_env, controllers, engine, monkeypatch
) -> None:
    """Its path is no longer inside the storage root (a storage moved, a row edited):
    every attempt fails; once the bounded attempts are spent the workflow ends (failed,
    with the reason) instead of retrying forever, and a later change starts a new one."""
    assert workspace_scan._SCAN_RETRY.maximum_attempts > 0  # bounded in production
    # Same bound, without the minutes of back-off: this worker runs the workflow code
    # outside the sandbox, so it reads the patched policy.
    monkeypatch.setattr(workspace_scan, "_SCAN_RETRY", RetryPolicy(
        initial_interval=timedelta(milliseconds=50), maximum_attempts=3))
    client = temporal_env.client
    user_id = await upsert_user(UserInfo(username=f"sc{secrets.token_hex(4)}", email="s@x"))
    ws = (await Workspace.insert(Workspace(
        user=user_id, name="moved", status="idle", file_path="/etc",
        storage_name=controllers.main_storage.name)).returning(Workspace.id))[0]["id"]
    queue = f"scan-{uuid.uuid4()}"
    handle = client.get_workflow_handle_for(ScanWorkspaceWorkflow.run, scan_workflow_id(ws))
    async with Worker(client, task_queue=queue, workflows=WORKFLOWS,
                      activities=[WorkspaceActivities(controllers).scan_workspace],
                      interceptors=[FailurePolicyInterceptor()],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        await request_scan(client, queue, ws, "updated")
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), WAIT)
        ended = await handle.describe()
        assert ended.status == WorkflowExecutionStatus.FAILED
        # A later change is not stuck behind the failed run: it starts a new one.
        await request_scan(client, queue, ws, "updated")
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), WAIT)
        assert (await handle.describe()).run_id != ended.run_id
    cause = failed.value.cause
    assert isinstance(cause, ActivityError) and isinstance(cause.cause, ApplicationError)
    assert cause.cause.message == "Workspace path is not inside the storage root."
    history = await handle.fetch_history()
    started = [e.activity_task_started_event_attributes.attempt for e in history.events
               if e.HasField("activity_task_started_event_attributes")]
    assert started == [3]  # one activity, its last attempt recorded
    row = await Workspace.select(Workspace.disk_space).where(Workspace.id == ws).first()
    assert row["disk_space"] == 0


# --- the upkeep workflows ------------------------------------------------------------------


async def test_upkeep_workflows_recompute_usage_and_reconcile_orphans(
    temporal_env, controllers, engine
) -> None:
    client = temporal_env.client
    ws = await _workspace(controllers, files=("data.bin",))
    user_id = (await Workspace.select(Workspace.user).where(Workspace.id == ws).first())["user"]
    await quotas.set_quota(user_id, max_core_hours=100.0)
    old = datetime.now(UTC) - timedelta(hours=1)
    orphan = (await Job.insert(Job(user=user_id, workspace=ws, job_type="local_test_job",
                                   status="running", datetime_created=old,
                                   job_details={"metrics": {"reserved_core_hours": 1.0}}))
              .returning(Job.id))[0]["id"]
    await Job.insert(Job(user=user_id, workspace=ws, job_type="local_test_job",
                         status="complete", core_hours=0.25, datetime_created=old,
                         datetime_end=old))
    queue = f"upkeep-{uuid.uuid4()}"
    tag = uuid.uuid4().hex[:8]
    async with Worker(client, task_queue=queue, workflows=WORKFLOWS,
                      activities=activities_for(controllers, client),
                      interceptors=[FailurePolicyInterceptor()]):
        # Reconcile first, so the usage totals below see the orphan's reservation released.
        reconcile = await client.start_workflow(
            ReconcileJobsWorkflow.run, UpkeepInput(), id=f"test-reconcile-{tag}",
            task_queue=queue)
        reconciled = await asyncio.wait_for(reconcile.result(), 60)
        usage = await client.start_workflow(
            UsageUpkeepWorkflow.run, UpkeepInput(), id=f"test-usage-{tag}", task_queue=queue)
        used = await asyncio.wait_for(usage.result(), 120)
    assert orphan in reconciled.marked_failed and reconciled.checked >= 1
    row = await Job.select(Job.status, Job.job_details).where(Job.id == orphan).first()
    assert row["status"] == "failed" and "Its workflow no longer exists" in row["job_details"]
    assert used.users >= 1
    quota = await UserQuota.select().where(UserQuota.user == user_id).first()
    assert (quota["used_core_hours"], quota["reserved_core_hours"]) == (0.25, 0)
    assert quota["used_disk_space"] == 1000  # rescanned from the directory
    await maybe_record(reconcile, "upkeep_reconcile")
    await maybe_record(usage, "upkeep_usage")


# --- start-up and shutdown -----------------------------------------------------------------


def _intervals(description) -> list[timedelta]:
    return [i.every for i in description.schedule.spec.intervals]


async def test_schedules_follow_the_config_and_keep_a_pause(temporal_env, controllers) -> None:
    client = temporal_env.client
    queue = f"upkeep-{uuid.uuid4()}"
    prefix = f"test-{uuid.uuid4().hex[:8]}-"
    config = controllers.config
    usage = client.get_schedule_handle(prefix + USAGE_SCHEDULE)
    reconcile = client.get_schedule_handle(prefix + RECONCILE_SCHEDULE)
    try:
        await ensure_schedules(client, queue, config, prefix=prefix)
        await usage.pause(note="paused by an operator")
        before = await usage.describe()
        await ensure_schedules(client, queue, config, prefix=prefix)  # nothing changed
        assert (await usage.describe()).info.last_updated_at == before.info.last_updated_at

        changed = config.model_copy(update={"upkeep": config.upkeep.model_copy(
            update={"usage_interval_minutes": config.upkeep.usage_interval_minutes + 7})})
        await ensure_schedules(client, queue, changed, prefix=prefix)
        after = await usage.describe()
        assert _intervals(after) == [
            timedelta(minutes=config.upkeep.usage_interval_minutes + 7)]
        assert after.schedule.state.paused
        assert after.schedule.state.note == "paused by an operator"
        untouched = await reconcile.describe()
        assert _intervals(untouched) == [
            timedelta(minutes=config.upkeep.reconcile_interval_minutes)]
        assert not untouched.schedule.state.paused

        # A new task queue is followed too, the pause still kept.
        await ensure_schedules(client, queue + "-moved", changed, prefix=prefix)
        moved = await usage.describe()
        assert isinstance(moved.schedule.action, ScheduleActionStartWorkflow)
        assert moved.schedule.action.task_queue == queue + "-moved"
        assert moved.schedule.action.workflow == "UsageUpkeepWorkflow"
        assert moved.schedule.state.paused
    finally:
        for handle in (usage, reconcile):
            await handle.delete()


async def test_worker_gives_running_activities_time_on_shutdown(
    temporal_env, controllers, monkeypatch
) -> None:
    # Built, never run (one queue each: the SDK refuses two workers on one queue).
    default = build_worker(temporal_env.client, controllers, f"shutdown-{uuid.uuid4()}")
    chosen = build_worker(temporal_env.client, controllers, f"shutdown-{uuid.uuid4()}",
                          shutdown_seconds=3)
    assert default.config()["graceful_shutdown_timeout"] == timedelta(seconds=30)
    assert chosen.config()["graceful_shutdown_timeout"] == timedelta(seconds=3)
    assert Settings().worker_shutdown_seconds == 30
    monkeypatch.setenv("UWS_WORKER_SHUTDOWN_SECONDS", "12.5")
    assert Settings().worker_shutdown_seconds == 12.5
