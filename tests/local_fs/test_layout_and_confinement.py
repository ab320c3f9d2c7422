"""LocalFileSystemStorage on a real tmp dir: layout, creation, writes and scans, rejected
names, confinement against planted links, symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from controllers.base import ExternalAccount, FileSpec, SymlinkSpec
from controllers.errors import BackendError, InvalidRequest
from controllers.storage.local_fs import LocalFileSystemStorage
from tests.local_fs.helpers import (
    LONG_COMPONENT,
    LONG_PATH,
    entries,
    exists,
    is_link,
    is_real_dir,
    make_storage,
    mode,
)

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
