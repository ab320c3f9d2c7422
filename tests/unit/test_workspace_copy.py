"""LocalFileSystemStorage.copy_workspace: a complete, confined, resumable copy on a tmp dir."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from controllers.base import CopyProgress, ExternalAccount
from controllers.errors import BackendError
from controllers.storage.local_fs import LocalFileSystemStorage, copy_engine, copy_entries

Tree = dict[str, tuple[object, ...]]


class Crash(Exception):
    """What a test's ``progress`` raises to stop a copy half-way, like a dying worker."""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def storage(root: Path) -> LocalFileSystemStorage:
    return LocalFileSystemStorage("local", LocalFileSystemStorage.Settings(root_dir=str(root)))


@pytest.fixture
def account() -> ExternalAccount:
    return ExternalAccount(username="alice", uid=os.geteuid(), gid=os.getegid())


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    (path / "tree").mkdir(parents=True)
    (path / "secret.txt").write_text("secret")
    for i in range(20):
        (path / "tree" / f"big{i}.bin").write_bytes(os.urandom(64 * 1024))
    return path


async def new_workspace(
    storage: LocalFileSystemStorage, account: ExternalAccount, workspace_id: int
) -> Path:
    path = storage.workspace_path(account, workspace_id)
    await storage.create_workspace(path, account)
    return Path(path)


@pytest.fixture
async def source(storage: LocalFileSystemStorage, account: ExternalAccount, outside: Path) -> Path:
    """A workspace with nested dirs, modes, dot-entries, links in and out, and a FIFO.

    ``a`` (a dir), ``a.txt`` and ``a-b`` make sorted-path order differ from string order."""
    ws = await new_workspace(storage, account, 1)
    files = {
        "a/b/deep.bin": os.urandom(200_000),
        "a/one.txt": b"one",
        "a.txt": b"hello",
        "a-b": b"dash",
        "empty.txt": b"",
        "run.sh": b"#!/bin/sh\n",
        "ro/inside.txt": b"in a read-only dir",
        "z/last.txt": b"last",
        ".hidden": b"not copied",
        ".cache/inner.txt": b"not copied either",
        "a/.secret": b"nor this",
    }
    for name, data in files.items():
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_bytes(data)
    (ws / "emptydir").mkdir()
    os.chmod(ws / "a.txt", 0o640)
    os.chmod(ws / "run.sh", 0o4755)  # set-uid: dropped by the copy
    os.symlink(outside / "secret.txt", ws / "link_out")
    os.symlink(outside / "tree", ws / "a" / "dir_link")  # a symlinked directory
    os.symlink("a.txt", ws / "rel_link")
    os.symlink("missing", ws / "dangling")
    os.symlink("a.txt", ws / ".hidden_link")
    os.mkfifo(ws / "fifo")
    os.utime(ws / "a.txt", ns=(1_000_000_000, 1_234_567_890_123_456_789))
    os.chmod(ws / "ro", 0o555)
    return ws


@pytest.fixture
async def target(storage: LocalFileSystemStorage, account: ExternalAccount) -> Path:
    return await new_workspace(storage, account, 2)


def tree(top: Path | str, *, hidden: bool = True) -> Tree:
    """Every entry below ``top`` (links not followed): type, mode, content or link text,
    mtime. ``hidden=False`` leaves out dot-names (what a copy should hold)."""
    out: Tree = {}

    def walk(path: str, rel: str) -> None:
        with os.scandir(path) as it:
            for entry in it:
                if not hidden and entry.name.startswith("."):
                    continue
                name = f"{rel}{entry.name}"
                st = entry.stat(follow_symlinks=False)
                if entry.is_symlink():
                    out[name] = ("link", os.readlink(entry.path), st.st_mtime_ns)
                elif entry.is_dir(follow_symlinks=False):
                    out[name] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
                    walk(entry.path, f"{name}/")
                elif entry.is_file(follow_symlinks=False):
                    data = Path(entry.path).read_bytes()
                    out[name] = ("file", stat.S_IMODE(st.st_mode), data, st.st_mtime_ns)
                else:
                    out[name] = ("other",)

    walk(str(top), "")
    return out


def expected_copy(source: Path) -> Tree:
    """What the target should hold: the source minus dot-names and FIFOs, set-id dropped."""
    out: Tree = {}
    for name, info in tree(source, hidden=False).items():
        if info[0] == "other":
            continue
        if info[0] in ("file", "dir"):
            kind, mode, *rest = info
            info = (kind, int(str(mode)) & 0o777, *rest)
        out[name] = info
    return out


def walk_order(copy: Tree) -> list[str]:
    return sorted(copy, key=lambda name: name.split("/"))


def inodes(top: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every regular file: a file copied again gets a new inode."""
    out = {}
    for name, info in tree(top).items():
        if info[0] == "file":
            st = os.lstat(top / name)
            out[name] = (st.st_ino, st.st_mtime_ns)
    return out


def totals(copy: Tree) -> tuple[int, int]:
    files = [info for info in copy.values() if info[0] in ("file", "link")]
    size = sum(len(bytes(info[2])) for info in files if info[0] == "file")
    return len(files), size


def parts_left(top: Path) -> list[str]:
    return [name for name in tree(top) if ".uws-copy-" in name]


def crash_after(count: int, seen: list[CopyProgress]) -> Callable[[CopyProgress], None]:
    """A ``progress`` that records each report and raises on the ``count``-th."""

    def progress(report: CopyProgress) -> None:
        asyncio.get_running_loop()  # called on the event loop, never from a thread
        seen.append(report)
        if len(seen) >= count:
            raise Crash

    return progress


# --- a full copy --------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 4])
async def test_full_copy_equals_source(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    source: Path,
    target: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
) -> None:
    monkeypatch.setattr(copy_engine, "COPY_THREADS", threads)
    reports: list[CopyProgress] = []
    result = await storage.copy_workspace(
        str(source), str(target), account, progress=reports.append
    )

    expected = expected_copy(source)
    assert tree(target) == expected  # no dot-names, no FIFO, no temporary files
    assert expected["run.sh"][1] == 0o755
    assert expected["ro"][1] == 0o555
    assert expected["a.txt"][3] == 1_234_567_890_123_456_789
    assert expected["link_out"][1] == str(outside / "secret.txt")  # pointing outside
    assert expected["a/dir_link"][0] == "link"  # a symlinked dir stays a link...
    assert not any(name.startswith("a/dir_link/") for name in tree(target))  # ...not followed

    order = walk_order(expected)
    assert order.index("a/one.txt") < order.index("a-b") < order.index("a.txt")
    assert [report.last_path for report in reports] == order
    assert (result.files_done, result.bytes_done) == totals(expected)
    assert result == reports[-1]
    assert result.last_path == "z/last.txt"


async def test_copy_into_a_non_empty_target_replaces_same_names(
    storage: LocalFileSystemStorage, account: ExternalAccount, source: Path, target: Path
) -> None:
    (target / "a.txt").write_text("stale")
    os.symlink("elsewhere", target / "rel_link")
    (target / "extra.txt").write_text("kept")
    await storage.copy_workspace(str(source), str(target), account)
    copy = tree(target)
    assert copy.pop("extra.txt")[2] == b"kept"  # a copy adds and replaces, never deletes
    assert copy == expected_copy(source)


async def test_copy_of_an_empty_workspace(
    storage: LocalFileSystemStorage, account: ExternalAccount, target: Path
) -> None:
    empty = await new_workspace(storage, account, 3)
    assert await storage.copy_workspace(str(empty), str(target), account) == CopyProgress()
    assert tree(target) == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
async def test_copy_is_owned_by_the_account(
    storage: LocalFileSystemStorage, account: ExternalAccount, source: Path, target: Path
) -> None:
    other = ExternalAccount(username="bob", uid=12345, gid=23456)
    await storage.copy_workspace(str(source), str(target), other)
    for name in tree(target):
        st = os.lstat(target / name)
        assert (st.st_uid, st.st_gid) == (12345, 23456), name


# --- confinement ---------------------------------------------------------------------------------


async def test_nothing_behind_a_symlink_is_read(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    source: Path,
    target: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every fd the copy opens is checked: none is a file or directory of the outside tree."""
    forbidden = {(st.st_dev, st.st_ino) for st in map(os.lstat, outside.rglob("*"))}
    forbidden.add((os.lstat(outside).st_dev, os.lstat(outside).st_ino))
    opened: list[tuple[int, int]] = []
    real_open = os.open

    def recording_open(*args: object, **kwargs: object) -> int:
        fd = real_open(*args, **kwargs)  # type: ignore[arg-type]
        st = os.fstat(fd)
        opened.append((st.st_dev, st.st_ino))
        return fd

    monkeypatch.setattr(copy_engine.os, "open", recording_open)
    result = await storage.copy_workspace(str(source), str(target), account)
    monkeypatch.undo()

    assert opened and not forbidden.intersection(opened)
    assert result.bytes_done == totals(expected_copy(source))[1]  # no 64 KiB file of the tree
    assert tree(target) == expected_copy(source)


@pytest.mark.parametrize("where", ["source", "target"])
async def test_paths_outside_root_are_rejected(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    source: Path,
    target: Path,
    root: Path,
    outside: Path,
    where: str,
) -> None:
    before = tree(outside)
    for bad in (str(outside), str(root), f"{root}/alice/../..", str(root.parent)):
        src, dst = (bad, str(target)) if where == "source" else (str(source), bad)
        with pytest.raises(BackendError):
            await storage.copy_workspace(src, dst, account)
    assert tree(target) == {}
    assert tree(outside) == before


async def test_copy_into_itself_or_a_missing_target_is_rejected(
    storage: LocalFileSystemStorage, account: ExternalAccount, source: Path, root: Path
) -> None:
    for dst in (source, source / "a", source / "emptydir", root / "alice" / "404"):
        with pytest.raises(BackendError):
            await storage.copy_workspace(str(source), str(dst), account)
    with pytest.raises(BackendError):  # a source inside its target
        await storage.copy_workspace(str(source / "a"), str(source), account)
    assert tree(source / "emptydir") == {}


async def test_target_symlink_in_place_of_a_dir_is_not_followed(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    source: Path,
    target: Path,
    outside: Path,
) -> None:
    os.symlink(outside / "tree", target / "a")  # planted where the copy puts a directory
    before = tree(outside)
    with pytest.raises(BackendError):
        await storage.copy_workspace(str(source), str(target), account)
    assert tree(outside) == before
    assert parts_left(target) == []


# --- crashes and resuming ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3])
async def test_resume_after_a_crash_at_every_entry(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    source: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunk: int,
) -> None:
    """For each possible crash point: the resumed copy is complete and identical, nothing
    copied before the crash is copied again (same inode), no temporary file remains."""
    monkeypatch.setattr(copy_engine, "COPY_CHUNK_ENTRIES", chunk)
    expected = expected_copy(source)
    order = walk_order(expected)
    for crash_at in range(1, len(order)):
        target = await new_workspace(storage, account, 100 + crash_at)
        seen: list[CopyProgress] = []
        with pytest.raises(Crash):
            await storage.copy_workspace(
                str(source), str(target), account, progress=crash_after(crash_at, seen)
            )
        last = seen[-1].last_path
        assert last == order[crash_at - 1]
        before = inodes(target)
        # On disk: the entries of every chunk whose reports started (never fewer).
        copied = -(-crash_at // chunk) * chunk
        assert set(tree(target)) == set(order[:copied])

        resumed: list[CopyProgress] = []
        result = await storage.copy_workspace(
            str(source), str(target), account, resume_after=last, progress=resumed.append
        )
        assert tree(target) == expected, f"crash after {last}"
        assert {name: inodes(target)[name] for name in before} == before
        # Reports go on after the resume point; totals cover the whole workspace.
        assert [r.last_path for r in resumed] == order[crash_at:]
        assert (result.files_done, result.bytes_done) == totals(expected)
        assert parts_left(target) == []


async def test_resume_without_progress_skips_files_before_the_resume_point(
    storage: LocalFileSystemStorage, account: ExternalAccount, source: Path, target: Path
) -> None:
    """Entries up to ``resume_after`` are assumed done: not looked at in the target."""
    result = await storage.copy_workspace(str(source), str(target), account, resume_after="a.txt")
    copy = tree(target)
    order = walk_order(expected_copy(source))
    after = order[order.index("a.txt") + 1 :]
    # Only the directories on the way to the resume point exist, and what comes after it.
    assert sorted(copy) == sorted(after)
    assert (result.files_done, result.bytes_done) == totals(expected_copy(source))


async def test_stray_temp_files_from_a_crash_inside_a_file_are_removed(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    source: Path,
    target: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(copy_engine, "COPY_CHUNK_ENTRIES", 1)
    seen: list[CopyProgress] = []
    with pytest.raises(Crash):
        await storage.copy_workspace(
            str(source), str(target), account, progress=crash_after(2, seen)
        )
    assert seen[-1].last_path == "a/b"
    # The worker died while writing a/b/deep.bin and a/one.txt (two temp files).
    (target / "a" / "b" / ".uws-copy-deadbeef.part").write_bytes(b"half")
    (target / ".uws-copy-0123abcd.part").write_bytes(b"half")
    os.symlink("x", target / "a" / ".uws-copy-feed.part")
    (target / ".uws-copy-keep").write_text("not ours: kept")

    await storage.copy_workspace(str(source), str(target), account, resume_after="a/b")
    copy = tree(target)
    assert copy.pop(".uws-copy-keep")
    assert copy == expected_copy(source)


async def test_failure_inside_a_file_leaves_no_partial_file(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    source: Path,
    target: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_copy = copy_entries._copy_data

    def failing_copy(src: int, dst: int) -> int:
        if os.fstat(src).st_size == 200_000:
            os.write(dst, b"partial")
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(copy_entries, "_copy_data", failing_copy)
    with pytest.raises(BackendError):
        await storage.copy_workspace(str(source), str(target), account)
    assert not os.path.lexists(target / "a" / "b" / "deep.bin")
    assert parts_left(target) == []

    monkeypatch.undo()
    await storage.copy_workspace(str(source), str(target), account)
    assert tree(target) == expected_copy(source)


async def test_changed_source_resumes_from_the_start_without_recopying(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    source: Path,
    target: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(copy_engine, "COPY_CHUNK_ENTRIES", 1)
    seen: list[CopyProgress] = []
    with pytest.raises(Crash):
        await storage.copy_workspace(
            str(source), str(target), account, progress=crash_after(9, seen)
        )
    last = seen[-1].last_path
    before = inodes(target)
    assert "a.txt" in before

    # The source changes: the resume point goes away, one copied file is rewritten.
    (source / last).unlink()
    (source / "a.txt").write_text("rewritten")
    (source / "new.txt").write_text("new")

    result = await storage.copy_workspace(str(source), str(target), account, resume_after=last)
    copy = tree(target)
    assert copy.pop(last)  # a copy never deletes what its source lost
    assert copy == expected_copy(source)
    after = inodes(target)
    assert after["a.txt"] != before.pop("a.txt")
    assert {name: after[name] for name in before} == before  # identical: not copied again
    assert (result.files_done, result.bytes_done) == totals(expected_copy(source))


async def test_cancelled_copy_closes_cleanly_and_resumes(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    source: Path,
    target: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(copy_engine, "COPY_CHUNK_ENTRIES", 1)
    seen: list[CopyProgress] = []
    tasks: list[asyncio.Task[CopyProgress]] = []

    def progress(report: CopyProgress) -> None:
        seen.append(report)
        if len(seen) == 3:
            tasks[0].cancel()  # lands at the copy's next await: a chunk in the thread pool

    fds_before = len(os.listdir("/proc/self/fd"))
    tasks.append(
        asyncio.create_task(
            storage.copy_workspace(str(source), str(target), account, progress=progress)
        )
    )
    task = tasks[0]
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every directory fd closed
    assert parts_left(target) == []
    await storage.copy_workspace(str(source), str(target), account, resume_after=seen[-1].last_path)
    assert tree(target) == expected_copy(source)
