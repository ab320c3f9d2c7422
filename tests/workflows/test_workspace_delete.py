"""``DeleteWorkspaceWorkflow`` on the real dev server with the real activities."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

from temporalio.client import Client

from app.worker import build_worker
from controllers.base import UserInfo
from db.accounts import upsert_user
from db.tables import Workspace
from tests.replay.recording import maybe_record
from workflows.models import DeleteWorkspaceInput
from workflows.workspace_delete import DeleteWorkspaceWorkflow


async def _workspace(path: str, storage: str) -> int:
    user_id = await upsert_user(UserInfo(username=f"del{secrets.token_hex(4)}", email="d@x"))
    row = await Workspace.insert(Workspace(
        user=user_id, name="to delete", description="", file_path=path, storage_name=storage,
        status="deleting",
    )).returning(Workspace.id)
    return row[0]["id"]


async def _run(client: Client, controllers, workspace_id: int, record_as: str):
    queue = f"delete-{uuid.uuid4()}"
    async with build_worker(client, controllers, queue, shutdown_seconds=0):
        handle = await client.start_workflow(
            DeleteWorkspaceWorkflow.run, DeleteWorkspaceInput(workspace_id=workspace_id),
            id=f"test-delete-{uuid.uuid4()}", task_queue=queue)
        result = await handle.result()
        await maybe_record(handle, record_as)
    return result


async def test_deletes_directory_then_row(temporal_env, controllers, engine) -> None:
    storage = controllers.main_storage
    path = Path(storage.root_dir) / "someone" / secrets.token_hex(4)
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "f.txt").write_text("x")
    wid = await _workspace(str(path), storage.name)
    result = await _run(temporal_env.client, controllers, wid, "delete_workspace_ok")
    assert result.deleted
    assert not path.exists()
    assert await Workspace.count().where(Workspace.id == wid) == 0


async def test_refused_deletion_ends_in_error_with_reason(
    temporal_env, controllers, engine, tmp_path
) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    wid = await _workspace(str(outside), controllers.main_storage.name)
    result = await _run(temporal_env.client, controllers, wid, "delete_workspace_refused")
    assert not result.deleted
    row = await Workspace.select(Workspace.status, Workspace.status_reason).where(
        Workspace.id == wid).first()
    assert row["status"] == "error"
    assert row["status_reason"].startswith("Deletion failed:")
    assert (outside / "keep.txt").read_text() == "keep"


async def test_deleting_a_row_already_gone_is_a_success(temporal_env, controllers, engine) -> None:
    result = await _run(temporal_env.client, controllers, 987654321, "delete_workspace_gone")
    assert result.deleted
