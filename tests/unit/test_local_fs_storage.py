"""LocalFileSystemStorage: layout, confinement, uploads, scans and deletes on a real tmp dir."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from controllers.base import ExternalAccount, FileSpec, SymlinkSpec
from controllers.errors import BackendError, InvalidRequest, PayloadTooLarge
from controllers.storage.local_fs import LocalFileSystemStorage

LONG_COMPONENT = "x" * 256
LONG_PATH = "/".join(["d" * 200] * 21)  # every component fine, the whole > 4096 bytes


def make_storage(root: Path, **settings: object) -> LocalFileSystemStorage:
    return LocalFileSystemStorage(
        "local", LocalFileSystemStorage.Settings(root_dir=str(root), **settings)
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text("secret")
    return path


@pytest.fixture
def storage(root: Path, outside: Path) -> LocalFileSystemStorage:
    # Symlinks are off by default; these tests may link into ``outside``.
    return make_storage(root, allowed_symlink_sources=[str(outside)])


@pytest.fixture
def account() -> ExternalAccount:
    return ExternalAccount(username="alice", uid=os.geteuid(), gid=os.getegid())


@pytest.fixture
async def ws(storage: LocalFileSystemStorage, account: ExternalAccount) -> Path:
    path = storage.workspace_path(account, 1)
    await storage.create_workspace(path, account)
    return Path(path)


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# Plain helpers: ruff's ASYNC240 flags these blocking checks inline in async tests.
def exists(path: Path | str) -> bool:
    return os.path.lexists(path)


def is_real_dir(path: Path | str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def is_link(path: Path | str) -> bool:
    return os.path.islink(path)


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- settings and layout ----------------------------------------------------------------------


def test_settings_reject_unknown_keys(root: Path) -> None:
    with pytest.raises(ValidationError, match="nope"):
        LocalFileSystemStorage.Settings(root_dir=str(root), nope=1)


def test_workspace_path(storage: LocalFileSystemStorage, root: Path) -> None:
    account = ExternalAccount(username="bob")
    assert storage.workspace_path(account, 42) == os.path.join(str(root), "bob", "42")


@pytest.mark.parametrize("username", ["", ".", "..", "a/b", "a\0b"])
def test_workspace_path_rejects_bad_usernames(
    storage: LocalFileSystemStorage, username: str
) -> None:
    with pytest.raises(BackendError):
        storage.workspace_path(ExternalAccount(username=username), 1)


# --- create -----------------------------------------------------------------------------------


async def test_create_workspace(
    storage: LocalFileSystemStorage, account: ExternalAccount, root: Path
) -> None:
    assert not exists(root)  # created lazily
    path = Path(storage.workspace_path(account, 7))
    await storage.create_workspace(str(path), account)
    assert is_real_dir(path)
    assert mode(path) == 0o700
    assert path.parent == root / "alice"


async def test_create_workspace_refuses_existing_dir(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path
) -> None:
    with pytest.raises(BackendError):
        await storage.create_workspace(str(ws), account)


async def test_create_workspace_without_uid_or_ownership(root: Path) -> None:
    for storage, account in [
        (make_storage(root), ExternalAccount(username="nouid")),
        (make_storage(root, set_ownership=False), ExternalAccount(username="x", uid=12345)),
    ]:
        path = storage.workspace_path(account, 1)
        await storage.create_workspace(path, account)
        assert os.stat(path).st_uid == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
async def test_create_and_write_chown_to_account(storage: LocalFileSystemStorage) -> None:
    account = ExternalAccount(username="carol", uid=12345, gid=23456)
    path = storage.workspace_path(account, 1)
    await storage.create_workspace(path, account)
    await storage.write_files(path, account, [FileSpec(name="d/f.txt", content="x")], [])
    for rel in ("", "d", "d/f.txt"):
        st = os.stat(os.path.join(path, rel))
        assert (st.st_uid, st.st_gid) == (12345, 23456)


@pytest.mark.parametrize("where", ["root", "outside", "dotdot"])
async def test_create_workspace_must_be_inside_root(
    storage: LocalFileSystemStorage, account: ExternalAccount, root: Path, tmp_path: Path, where
) -> None:
    path = {
        "root": str(root),
        "outside": str(tmp_path / "elsewhere" / "1"),
        "dotdot": f"{root}/alice/../../escape",
    }[where]
    with pytest.raises(BackendError):
        await storage.create_workspace(path, account)
    assert not exists(tmp_path / "elsewhere")
    assert not exists(tmp_path / "escape")


# --- write and scan round trip ----------------------------------------------------------------


async def test_write_and_scan_round_trip(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path, outside: Path
) -> None:
    files = [
        FileSpec(name="a.txt", content="hello"),
        FileSpec(name="sub/dir/b.txt", content="héllo"),
        FileSpec(name=".hidden", content="123"),
        FileSpec(name=".cache/inner.txt", content="4567"),
        FileSpec(name="./c.txt", content=""),
    ]
    links = [SymlinkSpec(name="data/secret", source_path=str(outside / "secret.txt"))]
    await storage.write_files(str(ws), account, files, links)

    assert (ws / "sub" / "dir" / "b.txt").read_text("utf-8") == "héllo"
    assert os.readlink(ws / "data" / "secret") == str(outside / "secret.txt")

    scan = await storage.scan(str(ws))
    assert scan.files == ["/a.txt", "/c.txt", "/sub/dir/b.txt"]
    assert scan.symlinks == ["/data/secret"]
    # dot-files (and files in dot-dirs) count; the link target outside does not
    assert scan.disk_space == 5 + len("héllo".encode()) + 3 + 4


async def test_rewrite_truncates(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path
) -> None:
    await storage.write_files(str(ws), account, [FileSpec(name="f", content="long content")], [])
    await storage.write_files(str(ws), account, [FileSpec(name="f", content="short")], [])
    assert (ws / "f").read_text() == "short"


async def test_scan_missing_workspace(storage: LocalFileSystemStorage, root: Path) -> None:
    scan = await storage.scan(str(root / "alice" / "404"))
    assert (scan.disk_space, scan.files, scan.symlinks) == (0, [], [])


async def test_scan_does_not_follow_symlinked_dir(
    storage: LocalFileSystemStorage, ws: Path, outside: Path
) -> None:
    (outside / "big.bin").write_bytes(b"x" * 10_000)
    (ws / "mine.txt").write_text("12")
    os.symlink(outside, ws / "link")
    os.symlink(outside, ws / ".hidden_link")
    scan = await storage.scan(str(ws))
    assert scan.files == ["/mine.txt"]
    assert scan.symlinks == ["/link"]
    assert scan.disk_space == 2


async def test_write_into_missing_workspace(
    storage: LocalFileSystemStorage, account: ExternalAccount, root: Path
) -> None:
    with pytest.raises(BackendError):
        await storage.write_files(str(root / "alice" / "9"), account, [FileSpec(name="f")], [])


# --- rejected names ---------------------------------------------------------------------------

FILE_CASES = [
    ("../x", "File name cannot contain double dots."),
    ("a/../../x", "File name cannot contain double dots."),
    ("a..b", "File name cannot contain double dots."),
    ("/etc/passwd", "Invalid file path specified /etc/passwd"),
    ("", "Invalid file path specified "),
    ("a\0b", "Invalid file path specified a\0b"),
    (LONG_COMPONENT, f"Invalid file path specified {LONG_COMPONENT}"),
    (f"dir/{LONG_COMPONENT}", f"Invalid file path specified dir/{LONG_COMPONENT}"),
    (LONG_PATH, f"Invalid file path specified {LONG_PATH}"),
]
SYMLINK_CASES = [
    ("../l", "Symlink name cannot contain double dots."),
    ("a..b", "Symlink name cannot contain double dots."),
    ("/abs/l", "Invalid symlink destination path specified /abs/l"),
    ("", "Invalid symlink destination path specified "),
    ("l\0", "Invalid symlink destination path specified l\0"),
    (LONG_COMPONENT, f"Invalid symlink destination path specified {LONG_COMPONENT}"),
    (LONG_PATH, f"Invalid symlink destination path specified {LONG_PATH}"),
]


@pytest.mark.parametrize(("name", "message"), FILE_CASES)
async def test_rejected_file_names(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    ws: Path,
    name: str,
    message: str,
) -> None:
    files = [FileSpec(name="ok.txt", content="x"), FileSpec(name=name, content="x")]
    with pytest.raises(InvalidRequest) as info:
        await storage.validate_files(files, [])
    assert info.value.user_message == message
    with pytest.raises(InvalidRequest) as info:
        await storage.write_files(str(ws), account, files, [])
    assert info.value.user_message == message
    assert entries(ws) == []  # validated before anything was written


@pytest.mark.parametrize(("name", "message"), SYMLINK_CASES)
async def test_rejected_symlink_names(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    ws: Path,
    outside: Path,
    name: str,
    message: str,
) -> None:
    links = [SymlinkSpec(name=name, source_path=str(outside))]
    with pytest.raises(InvalidRequest) as info:
        await storage.write_files(str(ws), account, [FileSpec(name="ok.txt")], links)
    assert info.value.user_message == message
    assert entries(ws) == []


async def test_files_are_checked_before_symlinks(storage: LocalFileSystemStorage) -> None:
    with pytest.raises(InvalidRequest) as info:
        await storage.validate_files(
            [FileSpec(name="/abs")], [SymlinkSpec(name="../l", source_path="/")]
        )
    assert info.value.user_message == "Invalid file path specified /abs"


# --- confinement against planted links ----------------------------------------------------------


async def test_planted_dir_symlink_is_not_followed(
    storage: LocalFileSystemStorage,
    account: ExternalAccount,
    ws: Path,
    tmp_path: Path,
    outside: Path,
) -> None:
    outside_dir = tmp_path / "outside_dir"
    outside_dir.mkdir()
    os.symlink(outside_dir, ws / "evil")
    with pytest.raises(InvalidRequest) as info:
        await storage.write_files(str(ws), account, [FileSpec(name="evil/x.txt", content="x")], [])
    assert info.value.user_message == "Invalid file path specified evil/x.txt"
    assert entries(outside_dir) == []

    link = SymlinkSpec(name="evil/l", source_path=str(outside))
    with pytest.raises(InvalidRequest) as info:
        await storage.write_files(str(ws), account, [], [link])
    assert info.value.user_message == "Invalid symlink destination path specified evil/l"
    assert entries(outside_dir) == []


async def test_planted_deep_symlink_is_not_followed(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path, outside: Path
) -> None:
    (ws / "a").mkdir()
    os.symlink(outside, ws / "a" / "b")
    with pytest.raises(InvalidRequest):
        await storage.write_files(str(ws), account, [FileSpec(name="a/b/c/x.txt")], [])
    assert entries(outside) == ["secret.txt"]


async def test_file_component_that_is_a_file(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path
) -> None:
    (ws / "plain").write_text("x")
    with pytest.raises(InvalidRequest) as info:
        await storage.write_files(str(ws), account, [FileSpec(name="plain/x.txt")], [])
    assert info.value.user_message == "Invalid file path specified plain/x.txt"


async def test_writing_onto_symlink_to_outside_is_rejected(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path, outside: Path
) -> None:
    os.symlink(outside / "secret.txt", ws / "target.txt")
    with pytest.raises(InvalidRequest) as info:
        await storage.write_files(
            str(ws), account, [FileSpec(name="target.txt", content="pwned")], []
        )
    assert info.value.user_message == "Invalid file path specified target.txt"
    assert (outside / "secret.txt").read_text() == "secret"


async def test_writing_onto_hard_link_is_rejected(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path, outside: Path
) -> None:
    os.link(outside / "secret.txt", ws / "hard.txt")
    with pytest.raises(InvalidRequest):
        await storage.write_files(str(ws), account, [FileSpec(name="hard.txt", content="x")], [])
    assert (outside / "secret.txt").read_text() == "secret"


async def test_writing_onto_directory_or_fifo_is_rejected(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path
) -> None:
    (ws / "dir").mkdir()
    os.mkfifo(ws / "fifo")
    for name in ("dir", "fifo"):
        with pytest.raises(InvalidRequest) as info:
            await storage.write_files(str(ws), account, [FileSpec(name=name, content="x")], [])
        assert info.value.user_message == f"Invalid file path specified {name}"


# --- symlinks -----------------------------------------------------------------------------------


async def test_symlink_to_missing_source(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path, outside: Path
) -> None:
    missing = str(outside / "missing")  # inside an allowed root: the reference's 500
    with pytest.raises(BackendError) as info:
        await storage.write_files(
            str(ws), account, [FileSpec(name="f")], [SymlinkSpec(name="l", source_path=missing)]
        )
    assert info.value.user_message == f"Symlink path not found: {missing}"
    assert entries(ws) == []  # checked before the files were written


async def test_symlink_replaces_only_a_symlink(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path, outside: Path
) -> None:
    other = outside / "other.txt"
    other.write_text("o")
    os.symlink(outside / "secret.txt", ws / "l")
    await storage.write_files(str(ws), account, [], [SymlinkSpec(name="l", source_path=str(other))])
    assert os.readlink(ws / "l") == str(other)
    assert entries(ws) == ["l"]  # no temporary link left behind

    (ws / "plain").write_text("keep")
    with pytest.raises(InvalidRequest) as info:
        await storage.write_files(
            str(ws), account, [], [SymlinkSpec(name="plain", source_path=str(other))]
        )
    assert info.value.user_message == "Invalid symlink destination path specified plain"
    assert (ws / "plain").read_text() == "keep"


async def test_allowed_symlink_sources(
    root: Path, account: ExternalAccount, tmp_path: Path, outside: Path
) -> None:
    datasets = tmp_path / "datasets"
    (datasets / "set1").mkdir(parents=True)
    os.symlink(outside, datasets / "escape")
    storage = make_storage(root, allowed_symlink_sources=[str(datasets)])
    path = storage.workspace_path(account, 1)
    await storage.create_workspace(path, account)

    ok = SymlinkSpec(name="set1", source_path=str(datasets / "set1"))
    await storage.write_files(path, account, [], [ok])
    assert is_link(os.path.join(path, "set1"))

    # Resolved (as the owner) when written, before anything is: validation alone only
    # refuses what the text shows (a relative source here).
    with pytest.raises(InvalidRequest) as info:
        await storage.validate_files([], [SymlinkSpec(name="x", source_path="set1")])
    assert info.value.user_message == "Symlink source not allowed: set1"
    for source in (str(outside), str(datasets / "escape"), "set1"):
        link = SymlinkSpec(name="x", source_path=source)
        with pytest.raises(InvalidRequest) as info:
            await storage.write_files(path, account, [FileSpec(name="f")], [link])
        assert info.value.user_message == f"Symlink source not allowed: {source}"
    assert entries(Path(path)) == ["set1"]


async def test_symlinks_are_off_by_default(
    root: Path, account: ExternalAccount, outside: Path
) -> None:
    storage = make_storage(root)
    path = storage.workspace_path(account, 1)
    await storage.create_workspace(path, account)
    for source in (str(outside), str(outside / "missing"), "/", "rel"):
        link = SymlinkSpec(name="l", source_path=source)
        with pytest.raises(InvalidRequest) as info:
            await storage.validate_files([], [link])
        assert info.value.user_message == f"Symlink source not allowed: {source}"
        with pytest.raises(InvalidRequest) as info:
            await storage.write_files(path, account, [FileSpec(name="f")], [link])
        assert info.value.user_message == f"Symlink source not allowed: {source}"
    assert entries(Path(path)) == []


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
