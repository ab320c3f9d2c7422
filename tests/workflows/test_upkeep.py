"""Scheduled upkeep: schedules exist and can be triggered; a job row whose workflow is
gone is marked failed with the reason; usage totals are recomputed."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta

from app.schedules import RECONCILE_SCHEDULE, USAGE_SCHEDULE, ensure_schedules
from app.worker import build_worker
from controllers.base import UserInfo
from db import quotas
from db.accounts import upsert_user
from db.tables import Job, UserQuota, Workspace
from tests.conftest import eventually


async def test_schedules_reconcile_orphans_and_recompute_usage(
    temporal_env, controllers, engine
) -> None:
    client = temporal_env.client
    user_id = await upsert_user(UserInfo(username=f"up{secrets.token_hex(4)}", email="u@x"))
    ws = (await Workspace.insert(Workspace(user=user_id, name="u", status="idle",
                                           disk_space=1234)).returning(Workspace.id))[0]["id"]
    old = datetime.now(UTC) - timedelta(hours=1)
    orphan = (await Job.insert(Job(user=user_id, workspace=ws, job_type="local_test_job",
                                   status="running", datetime_created=old,
                                   job_details={"metrics": {"reserved_core_hours": 2.0}}))
              .returning(Job.id))[0]["id"]
    finished = (await Job.insert(Job(user=user_id, workspace=ws, job_type="local_test_job",
                                     status="complete", core_hours=0.5, datetime_created=old,
                                     datetime_end=old)).returning(Job.id))[0]["id"]
    await quotas.set_quota(user_id, max_core_hours=100.0)
    queue = f"upkeep-{uuid.uuid4()}"
    prefix = f"test-{uuid.uuid4().hex[:8]}-"
    await ensure_schedules(client, queue, controllers.config, prefix=prefix)
    await ensure_schedules(client, queue, controllers.config, prefix=prefix)  # idempotent
    async with build_worker(client, controllers, queue, shutdown_seconds=0):
        await client.get_schedule_handle(prefix + RECONCILE_SCHEDULE).trigger()

        async def orphan_failed():
            row = await Job.select(Job.status, Job.job_details).where(Job.id == orphan).first()
            return row if row["status"] == "failed" else None

        row = await eventually(orphan_failed, timeout=60)
        assert "Its workflow no longer exists" in row["job_details"]
        await client.get_schedule_handle(prefix + USAGE_SCHEDULE).trigger()

        async def recomputed():
            q = await UserQuota.select().where(UserQuota.user == user_id).first()
            return q if q["used_core_hours"] == 0.5 else None

        quota = await eventually(recomputed, timeout=60)
    assert quota["reserved_core_hours"] == 0  # the orphan's reservation was released
    assert quota["used_disk_space"] == 1234  # no directory: the rescan left it as stored
    assert await Job.select(Job.status).where(Job.id == finished).first() == {
        "status": "complete"}
    for schedule_id in (USAGE_SCHEDULE, RECONCILE_SCHEDULE):
        await client.get_schedule_handle(prefix + schedule_id).delete()


async def test_rescan_goes_on_past_a_workspace_it_cannot_scan(
    temporal_env, controllers, engine
) -> None:
    """A workspace row whose path is outside the storage root (or whose storage is gone
    from the config) is skipped and logged; the others are still brought up to date."""
    from temporalio.testing import ActivityEnvironment

    from activities.upkeep import UpkeepActivities
    from tests.workflows.test_job_workflow import _job
    from workflows.models import UpkeepInput

    user_id, good, _, workdir = await _job(controllers)
    (workdir.parent.parent / "data.bin").write_bytes(b"x" * 4096)
    outside = (await Workspace.insert(Workspace(
        user=user_id, name="outside", status="idle", file_path="/etc",
        storage_name=controllers.main_storage.name, disk_space=7)).returning(Workspace.id))
    unknown = (await Workspace.insert(Workspace(
        user=user_id, name="gone", status="idle", file_path="/nowhere",
        storage_name="removed_storage", disk_space=9)).returning(Workspace.id))
    activities = UpkeepActivities(controllers, temporal_env.client)
    scanned = await ActivityEnvironment().run(activities.rescan_all_workspaces, UpkeepInput())
    assert scanned.workspaces >= 1
    row = await Workspace.select(Workspace.disk_space).where(Workspace.id == good).first()
    assert row["disk_space"] >= 4096
    for ws, stored in ((outside[0]["id"], 7), (unknown[0]["id"], 9)):
        row = await Workspace.select(Workspace.disk_space).where(Workspace.id == ws).first()
        assert row["disk_space"] == stored  # left as it was, not zeroed
