"""Storage isolation: symlink sources are no existence oracle and are checked as the owner;
names the server keeps inside a workspace (``.jobs/``, ``.uws*``) are never written by
client name. Unit level, against a real LocalFileSystemStorage on a tmp dir."""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controllers.base import ExternalAccount, FileSpec, SymlinkSpec
from controllers.errors import BackendError, InvalidRequest
from controllers.storage.local_fs import LocalFileSystemStorage
from tests.local_fs.helpers import make_storage

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def datasets(tmp_path: Path) -> Path:
    """An allowed root: a directory, a file, and a link in it that escapes it."""
    path = tmp_path / "datasets"
    (path / "set1").mkdir(parents=True)
    (path / "set1" / "file.txt").write_text("data")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, path / "escape")
    os.symlink(tmp_path / "nowhere", path / "dangling")
    return path


@pytest.fixture
def account() -> ExternalAccount:
    return ExternalAccount(username="alice", uid=os.geteuid(), gid=os.getegid())


async def new_workspace(
    storage: LocalFileSystemStorage, account: ExternalAccount, workspace_id: int = 1
) -> Path:
    path = storage.workspace_path(account, workspace_id)
    await storage.create_workspace(path, account)
    return Path(path)


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


def tree(path: Path) -> dict[str, str]:
    """Every entry below ``path`` (links not followed): relative name -> content/kind."""
    seen: dict[str, str] = {}
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(top, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                seen[rel] = "link:" + os.readlink(full)
            elif os.path.isdir(full):
                seen[rel] = "dir"
            else:
                seen[rel] = Path(full).read_text()
    return seen


async def refused_source(
    storage: LocalFileSystemStorage, account: ExternalAccount, ws: Path, source: str
) -> str:
    """The 400 message for linking ``source``; asserts nothing at all was written."""
    before = tree(ws)
    link = SymlinkSpec(name="l", source_path=source)
    with pytest.raises(InvalidRequest) as info:
        await storage.write_files(str(ws), account, [FileSpec(name="f", content="x")], [link])
    assert tree(ws) == before
    return info.value.user_message


# --- symlink sources: one answer for everything refused ---------------------------------------


@pytest.mark.parametrize("allowed", [False, True], ids=["symlinks-off", "datasets-allowed"])
async def test_refused_sources_all_give_the_same_400(
    root: Path, datasets: Path, account: ExternalAccount, tmp_path: Path, allowed: bool
) -> None:
    storage = make_storage(root, allowed_symlink_sources=[str(datasets)] if allowed else [])
    ws = await new_workspace(storage, account)
    other = ExternalAccount(username="bob", uid=os.geteuid(), gid=os.getegid())
    bobs = await new_workspace(storage, other, 2)
    (bobs / "private.txt").write_text("bob's")
    sources = [
        "/etc/shadow",  # exists
        "/etc/no-such-file-here",  # does not
        str(bobs),  # another user's workspace
        str(bobs / "private.txt"),
        str(ws),  # the workspace itself: not an allowed root either
        "/",
        "/no/such/path",
        str(datasets / "escape"),  # inside an allowed root, but resolves outside it
        str(datasets / "dangling"),  # likewise, and its target is missing
        f"{datasets}/../outside",
        "relative/path",
        "set1",
        "",
        "/etc/sha\0dow",
        "/\udcff",  # lone surrogate: names no file
        "/" + "x" * 5000,
    ]
    for source in sources:
        message = await refused_source(storage, account, ws, source)
        assert message == f"Symlink source not allowed: {source}", source
    # Validation alone already refuses everything when symlinks are off.
    if not allowed:
        for source in sources:
            with pytest.raises(InvalidRequest) as info:
                await storage.validate_files([], [SymlinkSpec(name="l", source_path=source)])
            assert info.value.user_message == f"Symlink source not allowed: {source}"
    assert (bobs / "private.txt").read_text() == "bob's"


async def test_existing_and_missing_outside_are_indistinguishable(
    root: Path, datasets: Path, account: ExternalAccount, tmp_path: Path
) -> None:
    storage = make_storage(root, allowed_symlink_sources=[str(datasets)])
    ws = await new_workspace(storage, account)
    (tmp_path / "outside" / "real.txt").write_text("x")
    answers = []
    for name in ("real.txt", "ghost.txt"):
        source = str(tmp_path / "outside" / name)
        message = await refused_source(storage, account, ws, source)
        answers.append(message.replace(name, "NAME"))
    assert answers[0] == answers[1]


async def test_link_inside_allowed_root(
    root: Path, datasets: Path, account: ExternalAccount
) -> None:
    storage = make_storage(root, allowed_symlink_sources=[str(datasets)])
    ws = await new_workspace(storage, account)
    links = [
        SymlinkSpec(name="set1", source_path=str(datasets / "set1")),
        SymlinkSpec(name="d/file", source_path=str(datasets / "set1" / "file.txt")),
        SymlinkSpec(name="all", source_path=str(datasets)),  # the root itself
        SymlinkSpec(name="dots", source_path=f"{datasets}/set1/../set1"),
    ]
    await storage.write_files(str(ws), account, [], links)
    for link in links:
        assert os.readlink(ws / link.name) == link.source_path  # the text as given


async def test_missing_target_inside_allowed_root_is_the_reference_500(
    root: Path, datasets: Path, account: ExternalAccount
) -> None:
    storage = make_storage(root, allowed_symlink_sources=[str(datasets)])
    ws = await new_workspace(storage, account)
    for source in (str(datasets / "missing"), str(datasets / "set1" / "file.txt" / "x")):
        links = [
            SymlinkSpec(name="ok", source_path=str(datasets / "set1")),
            SymlinkSpec(name="bad", source_path=source),
        ]
        with pytest.raises(BackendError) as info:
            await storage.write_files(str(ws), account, [FileSpec(name="f")], links)
        assert info.value.user_message == f"Symlink path not found: {source}"
        assert tree(ws) == {}  # checked before anything was written


# --- reserved names -----------------------------------------------------------------------------

RESERVED = [".jobs/1/x", ".uws-anything", "a/.uws-x", ".jobs", "./.jobs/x", "b/.uwsfoo/c"]


@pytest.fixture
async def state_ws(root: Path, datasets: Path, account: ExternalAccount) -> Path:
    """A workspace holding what the server keeps there (a job's files, a state file)."""
    storage = make_storage(root, allowed_symlink_sources=[str(datasets)])
    ws = await new_workspace(storage, account)
    (ws / ".jobs" / "1").mkdir(parents=True)
    (ws / ".jobs" / "1" / "x").write_text("server state")
    (ws / ".uws-anything").write_text("server state")
    return ws


@pytest.mark.parametrize("name", RESERVED)
async def test_reserved_names_refused_for_files(
    root: Path, datasets: Path, account: ExternalAccount, state_ws: Path, name: str
) -> None:
    storage = make_storage(root, allowed_symlink_sources=[str(datasets)])
    before = tree(state_ws)
    files = [FileSpec(name="ok.txt", content="x"), FileSpec(name=name, content="pwned")]
    for call in (
        storage.validate_files(files, []),
        storage.write_files(str(state_ws), account, files, []),
    ):
        with pytest.raises(InvalidRequest) as info:
            await call
        assert info.value.user_message == f"Invalid file path specified {name}"
    assert tree(state_ws) == before


@pytest.mark.parametrize("name", RESERVED)
async def test_reserved_names_refused_for_symlinks(
    root: Path, datasets: Path, account: ExternalAccount, state_ws: Path, name: str
) -> None:
    storage = make_storage(root, allowed_symlink_sources=[str(datasets)])
    before = tree(state_ws)
    links = [
        SymlinkSpec(name="ok", source_path=str(datasets / "set1")),
        SymlinkSpec(name=name, source_path=str(datasets / "set1")),
    ]
    for call in (
        storage.validate_files([], links),
        storage.write_files(str(state_ws), account, [FileSpec(name="f")], links),
    ):
        with pytest.raises(InvalidRequest) as info:
            await call
        assert info.value.user_message == f"Invalid symlink destination path specified {name}"
    assert tree(state_ws) == before


@pytest.mark.parametrize("name", [*RESERVED, "a/.jobs", "..\\.uws-pid", "/abs/.jobs"])
async def test_reserved_names_refused_for_uploads(
    root: Path, account: ExternalAccount, state_ws: Path, name: str
) -> None:
    storage = make_storage(root)
    before = tree(state_ws)
    with pytest.raises(InvalidRequest) as info:
        await storage.save_upload(str(state_ws), account, name, chunks_of(b"pwned"))
    assert info.value.user_message == f"Invalid file path specified {name}"
    assert tree(state_ws) == before  # no temporary file left either


async def test_names_that_only_resemble_reserved_ones_are_fine(
    root: Path, datasets: Path, account: ExternalAccount
) -> None:
    storage = make_storage(root, allowed_symlink_sources=[str(datasets)])
    ws = await new_workspace(storage, account)
    names = ["a/.jobs/x", ".jobsx", "x.uws", "uws-y", "d/.job"]
    await storage.write_files(
        str(ws),
        account,
        [FileSpec(name=name, content="ok") for name in names],
        [SymlinkSpec(name="l/.jobs", source_path=str(datasets))],
    )
    await storage.save_upload(str(ws), account, "up.uws", chunks_of(b"ok"))
    assert {rel for rel, kind in tree(ws).items() if kind == "ok"} == {*names, "up.uws"}
    assert os.path.islink(ws / "l" / ".jobs")


# --- resolution as the owner (root only) ----------------------------------------------------------


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """An allowed root any account can reach (pytest's tmp dirs are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="uws-sec-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def throwaway_account() -> Iterator[tuple[ExternalAccount, int]]:
    """A fresh OS account with one supplementary group: (account, that group's gid)."""
    tag = secrets.token_hex(4)
    user, group = f"uwst{tag}", f"uwsg{tag}"
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    try:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", group, user],
            check=True,
            capture_output=True,
        )
        try:
            entry = pwd.getpwnam(user)
            account = ExternalAccount(
                username=user, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir
            )
            yield account, int(
                subprocess.run(
                    ["getent", "group", group], check=True, capture_output=True, text=True
                ).stdout.split(":")[2]
            )
        finally:
            subprocess.run(["userdel", user], check=False, capture_output=True)
    finally:
        subprocess.run(["groupdel", group], check=False, capture_output=True)


@pytest.mark.skipif(not IS_ROOT or not shutil.which("useradd"), reason="needs root and useradd")
async def test_sources_are_resolved_as_the_owner(
    root: Path, world_dir: Path, throwaway_account: tuple[ExternalAccount, int]
) -> None:
    owner, group_gid = throwaway_account
    (world_dir / "public").mkdir(mode=0o755)
    (world_dir / "public" / "data").write_text("public")
    private = world_dir / "private"
    private.mkdir()
    private.chmod(0o700)  # root's
    (private / "data").write_text("root only")
    team = world_dir / "team"
    team.mkdir()
    os.chown(team, 0, group_gid)
    team.chmod(0o750)  # reachable through the owner's supplementary group only
    (team / "data").write_text("team")
    storage = make_storage(root, allowed_symlink_sources=[str(world_dir)])
    ws = await new_workspace(storage, owner)
    assert os.stat(ws).st_uid == owner.uid

    await storage.write_files(
        str(ws),
        owner,
        [],
        [
            SymlinkSpec(name="public", source_path=str(world_dir / "public" / "data")),
            SymlinkSpec(name="team", source_path=str(team / "data")),
        ],
    )
    assert os.readlink(ws / "team") == str(team / "data")
    assert os.lstat(ws / "public").st_uid == owner.uid

    # Root sees it; the owner cannot resolve it: refused, and a missing file under the same
    # directory gets the very same answer (not the "not found" 500 root's view would give).
    assert (private / "data").exists()
    for source in (str(private / "data"), str(private / "missing"), f"{private}/../private/x"):
        message = await refused_source(storage, owner, ws, source)
        assert message == f"Symlink source not allowed: {source}"
    # The directory itself the owner can see (it is listed in its parent), just not into it.
    await storage.write_files(
        str(ws), owner, [], [SymlinkSpec(name="dir", source_path=str(private))]
    )
    with pytest.raises(BackendError) as info:  # the owner can see this one is missing
        await storage.write_files(
            str(ws), owner, [], [SymlinkSpec(name="x", source_path=str(world_dir / "gone"))]
        )
    assert info.value.user_message == f"Symlink path not found: {world_dir / 'gone'}"

    # The same source for a workspace of root's own is fine: it is the identity that differs.
    me = ExternalAccount(username="rootuser", uid=0, gid=0)
    mine = await new_workspace(storage, me, 2)
    await storage.write_files(
        str(mine), me, [], [SymlinkSpec(name="p", source_path=str(private / "data"))]
    )
    assert os.readlink(mine / "p") == str(private / "data")


@pytest.mark.skipif(not IS_ROOT, reason="switching to another uid needs root")
async def test_uid_without_passwd_entry_resolves_as_that_uid(
    root: Path, world_dir: Path
) -> None:
    uid = next(u for u in range(61000, 65000) if not _has_passwd_entry(u))
    (world_dir / "open").mkdir(mode=0o755)
    private = world_dir / "private"
    private.mkdir()
    private.chmod(0o700)
    (private / "data").write_text("root only")
    storage = make_storage(root, allowed_symlink_sources=[str(world_dir)])
    ghost = ExternalAccount(username="ghost", uid=uid)  # no gid either: the uid's own
    ws = await new_workspace(storage, ghost)
    await storage.write_files(
        str(ws), ghost, [], [SymlinkSpec(name="o", source_path=str(world_dir / "open"))]
    )
    message = await refused_source(storage, ghost, ws, str(private / "data"))
    assert message == f"Symlink source not allowed: {private / 'data'}"


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
