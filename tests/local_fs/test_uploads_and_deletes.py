"""LocalFileSystemStorage on a real tmp dir: streamed uploads (limits, interruptions,
staging, leftovers), deletes and health."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controllers.base import ExternalAccount, FileSpec, SymlinkSpec
from controllers.errors import BackendError, InvalidRequest, PayloadTooLarge
from controllers.storage.local_fs import LocalFileSystemStorage
from tests.local_fs.helpers import (
    LONG_COMPONENT,
    chunks_of,
    entries,
    exists,
    is_real_dir,
    make_storage,
)

# --- uploads ------------------------------------------------------------------------------------


async def test_upload_streams_chunks(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path
) -> None:
    size = await storage.save_upload(
        str(ws), account, "data.bin", chunks_of(b"abc", b"", b"defg", b"h" * 100_000)
    )
    assert size == 7 + 100_000
    assert (ws / "data.bin").read_bytes() == b"abcdefg" + b"h" * 100_000
    assert entries(ws) == ["data.bin"]  # temporary file gone


async def test_upload_replaces_existing_file_and_allows_dot_files(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path
) -> None:
    (ws / "f.txt").write_text("old content")
    await storage.save_upload(str(ws), account, "f.txt", chunks_of(b"new"))
    assert (ws / "f.txt").read_bytes() == b"new"
    await storage.save_upload(str(ws), account, ".env", chunks_of(b"A=1"))
    assert (ws / ".env").read_bytes() == b"A=1"


async def test_upload_over_limit(root: Path, account: ExternalAccount) -> None:
    storage = make_storage(root, max_upload_bytes=10)
    path = storage.workspace_path(account, 1)
    await storage.create_workspace(path, account)
    assert await storage.save_upload(path, account, "ok", chunks_of(b"x" * 10)) == 10
    with pytest.raises(PayloadTooLarge) as info:
        await storage.save_upload(path, account, "big", chunks_of(b"x" * 6, b"x" * 6))
    assert info.value.user_message == "Upload exceeds the limit of 10 bytes."
    assert entries(Path(path)) == ["ok"]


@pytest.mark.parametrize(
    ("filename", "final"),
    [("../../etc/passwd", "passwd"), ("..\\..\\win.ini", "win.ini"), ("/abs/dir/x.txt", "x.txt")],
)
async def test_upload_keeps_only_the_final_component(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    ws: Path,
    root: Path,
    filename: str,
    final: str,
) -> None:
    await storage.save_upload(str(ws), account, filename, chunks_of(b"x"))
    assert entries(ws) == [final]
    assert entries(root) == ["alice"]


@pytest.mark.parametrize("filename", ["", ".", "..", "a/..", "dir/", "a\0b", LONG_COMPONENT])
async def test_upload_rejects_bad_names(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path, filename: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await storage.save_upload(str(ws), account, filename, chunks_of(b"x"))
    assert info.value.user_message == f"Invalid file path specified {filename}"
    assert entries(ws) == []


async def test_upload_onto_symlink_or_directory_is_rejected(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path, outside: Path
) -> None:
    os.symlink(outside / "secret.txt", ws / "link")
    (ws / "dir").mkdir()
    for name in ("link", "dir"):
        with pytest.raises(InvalidRequest) as info:
            await storage.save_upload(str(ws), account, name, chunks_of(b"pwned"))
        assert info.value.user_message == f"Invalid file path specified {name}"
    assert (outside / "secret.txt").read_text() == "secret"
    assert entries(ws) == ["dir", "link"]


async def test_upload_interrupted_by_error_leaves_nothing(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path
) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await storage.save_upload(str(ws), account, "f.txt", broken())
    assert entries(ws) == []


async def test_upload_cancelled_leaves_nothing(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path
) -> None:
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"partial"
        started.set()
        await asyncio.Event().wait()
        yield b"never"

    task = asyncio.create_task(storage.save_upload(str(ws), account, "f.txt", stalled()))
    await started.wait()
    # The temporary file exists meanwhile, beside the workspace: no scan or job sees it.
    staging = ws.parent / ".uws-staging"
    assert entries(ws) == [] and len(entries(staging)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert entries(ws) == [] and entries(staging) == []


async def test_staged_uploads_land_together_or_not_at_all(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path
) -> None:
    (ws / "f.txt").write_text("old")
    staging = ws.parent / ".uws-staging"
    staged = [await storage.stage_upload(str(ws), account, "f.txt", chunks_of(b"new")),
              await storage.stage_upload(str(ws), account, "g.txt", chunks_of(b"g" * 10))]
    assert [s.size for s in staged] == [3, 10]
    assert entries(ws) == ["f.txt"] and (ws / "f.txt").read_text() == "old"
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700 and len(entries(staging)) == 2
    storage.discard_uploads(staged)  # refused: nothing lands, the old file stays
    assert entries(ws) == ["f.txt"] and (ws / "f.txt").read_text() == "old"
    assert entries(staging) == []

    staged = [await storage.stage_upload(str(ws), account, "f.txt", chunks_of(b"new")),
              await storage.stage_upload(str(ws), account, "g.txt", chunks_of(b"g"))]
    await storage.commit_uploads(staged)
    storage.discard_uploads(staged)  # only closes what is committed
    assert entries(ws) == ["f.txt", "g.txt"] and (ws / "f.txt").read_text() == "new"
    assert entries(staging) == []


async def test_uploads_a_crash_left_are_removed_after_a_day(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path
) -> None:
    staging = ws.parent / ".uws-staging"
    await storage.save_upload(str(ws), account, "a.txt", chunks_of(b"a"))
    (staging / ".uws-upload-old.part").write_bytes(b"left behind")
    (staging / ".uws-upload-new.part").write_bytes(b"in progress")
    old = time.time() - 2 * 86400
    os.utime(staging / ".uws-upload-old.part", (old, old))
    await storage.save_upload(str(ws), account, "b.txt", chunks_of(b"b"))
    assert entries(staging) == [".uws-upload-new.part"]


# --- delete and health --------------------------------------------------------------------------


async def test_delete_does_not_follow_symlinks(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path, outside: Path
) -> None:
    await storage.write_files(
        str(ws),
        account,
        [FileSpec(name="sub/f.txt", content="x")],
        [SymlinkSpec(name="sub/data", source_path=str(outside))],
    )
    os.symlink(outside, ws / "top")
    await storage.delete_workspace(str(ws))
    assert not exists(ws)
    assert entries(outside) == ["secret.txt"]
    await storage.delete_workspace(str(ws))  # already gone: fine


async def test_delete_refuses_root_and_outside(
    storage: LocalFileSystemStorage, ws: Path, root: Path, outside: Path
) -> None:
    for path in (str(root), f"{root}/", str(outside), f"{root}/alice/../..", str(root.parent)):
        with pytest.raises(BackendError):
            await storage.delete_workspace(path)
    assert is_real_dir(ws)
    assert entries(outside) == ["secret.txt"]


async def test_delete_refuses_symlinked_workspace(
    storage: LocalFileSystemStorage, ws: Path, root: Path, outside: Path
) -> None:
    os.symlink(outside, root / "alice" / "2")
    with pytest.raises(BackendError):
        await storage.delete_workspace(str(root / "alice" / "2"))
    assert entries(outside) == ["secret.txt"]


async def test_health(
    storage: LocalFileSystemStorage, account: ExternalAccount, root: Path
) -> None:
    health = await storage.health()
    assert not health.ok
    assert str(root) in health.detail
    await storage.create_workspace(storage.workspace_path(account, 1), account)
    health = await storage.health()
    assert health.ok
    assert str(root) in health.detail
