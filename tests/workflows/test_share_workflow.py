"""``ShareWorkspaceWorkflow`` on the real dev server with the real activities; a storage
double (a subclass of the real one) dies half-way through its first copy."""

from __future__ import annotations

import dataclasses
import os
import secrets
import uuid
from pathlib import Path

from temporalio.client import Client

from app.worker import build_worker
from controllers.base import ExternalAccount, FileSpec, SymlinkSpec, UserInfo
from controllers.storage.local_fs import LocalFileSystemStorage
from db.accounts import upsert_user
from db.tables import SharedWorkspaceMapping, Workspace
from tests.conftest import dataset_dir, eventually
from tests.replay.recording import maybe_record
from workflows.models import ShareInput
from workflows.share import ShareWorkspaceWorkflow


class DiesMidCopy(LocalFileSystemStorage):
    """The first copy stops after a few files, as a worker killed half-way would."""

    attempts: list[str] = []
    inodes_at_crash: dict[str, int] = {}

    async def copy_workspace(self, source, target, account, resume_after="",
                             progress=None):
        type(self).attempts.append(resume_after)
        seen = 0

        def report(p):
            nonlocal seen
            if progress is not None:
                progress(p)
            seen += 1
            if len(type(self).attempts) == 1 and seen == 6:
                type(self).inodes_at_crash = {
                    str(f.relative_to(target)): f.stat().st_ino
                    for f in Path(target).rglob("*") if f.is_file()}
                raise RuntimeError("worker lost half-way through the copy")

        return await super().copy_workspace(source, target, account, resume_after, report)


async def _share(controllers, files: int = 12) -> tuple[int, int, Path, Path]:
    storage = controllers.main_storage
    tag = secrets.token_hex(4)
    sharer = await upsert_user(UserInfo(username=f"s{tag}", email=f"s{tag}@x.org"))
    recipient = await upsert_user(UserInfo(username=f"r{tag}", email=f"r{tag}@x.org"))
    account = ExternalAccount(username="share-tests")
    dataset = dataset_dir()
    original = (await Workspace.insert(Workspace(user=sharer, name=f"orig {tag}", status="idle",
                                                 storage_name=storage.name))
                .returning(Workspace.id))[0]["id"]
    source = storage.workspace_path(account, original)
    await storage.create_workspace(source, account)
    await storage.write_files(
        source, account,
        [FileSpec(name=f"d{i % 3}/f{i:02}.txt", content=f"file {i}" * 100) for i in range(files)]
        + [FileSpec(name=".hidden", content="no")],
        [SymlinkSpec(name="link", source_path=str(dataset))])
    copy = (await Workspace.insert(Workspace(user=recipient, name=f"orig {tag}",
                                             status="initializing", storage_name=storage.name))
            .returning(Workspace.id))[0]["id"]
    target = storage.workspace_path(account, copy)
    await Workspace.update({Workspace.file_path: source}).where(Workspace.id == original)
    await Workspace.update({Workspace.file_path: target}).where(Workspace.id == copy)
    await SharedWorkspaceMapping.insert(SharedWorkspaceMapping(
        original_workspace=original, shared_workspace=copy))
    return original, copy, Path(source), Path(target)


async def _start(client: Client, controllers, original: int, copy: int,
                 expiry: float = 3600):
    queue = f"share-{uuid.uuid4()}"
    worker = build_worker(client, controllers, queue, shutdown_seconds=0)
    handle = await client.start_workflow(
        ShareWorkspaceWorkflow.run,
        ShareInput(shared_workspace_id=copy, original_workspace_id=original,
                   expiry_seconds=expiry),
        id=f"share-test-{uuid.uuid4()}", task_queue=queue)
    return worker, handle


async def _status(workspace_id: int) -> str | None:
    row = await Workspace.select(Workspace.status, Workspace.status_reason).where(
        Workspace.id == workspace_id).first()
    return row["status"] if row else None


async def test_copy_resumes_after_a_crash_and_copies_nothing_twice(
    temporal_env, controllers, engine, mailbox
) -> None:
    base = controllers.main_storage
    double = DiesMidCopy(base.name, base.settings)
    swapped = dataclasses.replace(controllers, storage={base.name: double})
    original, copy, source, target = await _share(swapped)
    worker, handle = await _start(temporal_env.client, swapped, original, copy)
    async with worker:
        await eventually(lambda: _stage_is(handle, "invited"), timeout=60)
        await handle.signal(ShareWorkspaceWorkflow.accept)
        assert await handle.result() == "accepted"
        await maybe_record(handle, "share_resumed_accepted")
    # Resumed from the last progress Temporal recorded (heartbeats are throttled, so that
    # may lag the disk); files already on disk are recognised and kept either way.
    assert len(DiesMidCopy.attempts) == 2
    assert await _status(copy) == "idle"
    copied = {str(f.relative_to(target)) for f in target.rglob("*") if f.is_file()}
    expected = {str(f.relative_to(source)) for f in source.rglob("*")
                if f.is_file() and not f.name.startswith(".")}
    assert copied == expected
    assert os.readlink(target / "link") == os.readlink(source / "link")  # kept as a link
    assert DiesMidCopy.inodes_at_crash  # some files were copied before the crash ...
    for rel, inode in DiesMidCopy.inodes_at_crash.items():  # ... and never again
        assert (target / rel).stat().st_ino == inode, rel
    assert not list(target.rglob(".uws-copy-*"))


async def _stage_is(handle, stage: str) -> bool:
    return await handle.query(ShareWorkspaceWorkflow.current_stage) == stage


async def test_failed_copy_ends_in_error_with_reason(temporal_env, controllers, engine) -> None:
    original, copy, source, _ = await _share(controllers)
    await Workspace.update({Workspace.file_path: str(source) + "-missing"}).where(
        Workspace.id == original)
    worker, handle = await _start(temporal_env.client, controllers, original, copy)
    async with worker:
        assert await handle.result() == "failed"
        await maybe_record(handle, "share_failed")
    row = await Workspace.select(Workspace.status, Workspace.status_reason).where(
        Workspace.id == copy).first()
    assert row["status"] == "error"
    assert row["status_reason"].startswith("Copy failed:")


async def test_unaccepted_share_expires_and_is_removed(
    temporal_env, controllers, engine, mailbox
) -> None:
    original, copy, _, target = await _share(controllers)
    worker, handle = await _start(temporal_env.client, controllers, original, copy, expiry=3)
    async with worker:
        assert await handle.result() == "expired"
        await maybe_record(handle, "share_expired")
    assert await _status(copy) is None
    assert not target.exists()
    assert await _status(original) == "idle"


async def test_declined_share_is_removed(temporal_env, controllers, engine, mailbox) -> None:
    original, copy, _, target = await _share(controllers)
    worker, handle = await _start(temporal_env.client, controllers, original, copy)
    async with worker:
        await eventually(lambda: _stage_is(handle, "invited"), timeout=60)
        await handle.signal(ShareWorkspaceWorkflow.cancel_share)
        assert await handle.result() == "cancelled"
        await maybe_record(handle, "share_declined")
    assert await _status(copy) is None
    assert not target.exists()
