"""Property tests: whatever names a client sends, LocalFileSystemStorage never writes or
reads outside the workspace, and refuses with the contract's message otherwise.

One workspace per test holds traps: a link to a directory outside, a link to a file
outside, a dangling link, a real subdirectory. Names mix unicode, ``..``, ``.``, empty
and absolute parts, NUL, backslashes and over-long components.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controllers.base import ExternalAccount, FileSpec, SymlinkSpec
from controllers.errors import InvalidRequest
from controllers.storage.local_fs import LocalFileSystemStorage

SETTINGS = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
TRAPS = ["out", "outfile", "dangling", "sub", "..", ".", "", "/", "\\", "\0", "x" * 300]
segments = st.sampled_from(TRAPS) | st.text(min_size=1, max_size=12)
names = st.lists(segments, min_size=1, max_size=5).map("/".join) \
    | st.text(max_size=30) | st.just("/etc/passwd") | st.just("../../outside/secret.txt")


def snapshot(path: Path) -> dict[str, bytes | str]:
    """Every entry below ``path`` (links not followed): content, link target or 'dir'."""
    seen: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                seen[rel] = "-> " + os.readlink(full)
            elif os.path.isdir(full):
                seen[rel] = "dir"
            else:
                seen[rel] = Path(full).read_bytes()
    return seen


def setup(tmp: Path) -> tuple[LocalFileSystemStorage, ExternalAccount, str, Path]:
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    storage = LocalFileSystemStorage("local", LocalFileSystemStorage.Settings(
        root_dir=str(tmp / "root"), allowed_symlink_sources=[str(outside)]))
    account = ExternalAccount(username="fuzz", uid=os.geteuid(), gid=os.getegid())
    path = storage.workspace_path(account, 1)
    asyncio.run(storage.create_workspace(path, account))
    ws = Path(path)
    (ws / "sub").mkdir()
    os.symlink(outside, ws / "out")
    os.symlink(outside / "secret.txt", ws / "outfile")
    os.symlink(tmp / "nowhere", ws / "dangling")
    return storage, account, path, outside


def refused_properly(exc: InvalidRequest, name: str, template: str) -> bool:
    return exc.user_message in (template.format(name), "File name cannot contain double dots.",
                                "Symlink name cannot contain double dots.")


def test_written_files_stay_inside(tmp_path: Path) -> None:
    storage, account, path, outside = setup(tmp_path)
    before = snapshot(outside)

    @SETTINGS
    @given(name=names, content=st.text(max_size=20))
    def write(name: str, content: str) -> None:
        try:
            asyncio.run(storage.write_files(path, account, [FileSpec(name=name,
                                                                     content=content)], []))
        except InvalidRequest as exc:
            assert refused_properly(exc, name, "Invalid file path specified {}"), exc
        else:
            target = Path(path, *[p for p in name.split("/") if p not in ("", ".")])
            assert not target.is_symlink() and target.is_file()
            assert os.path.realpath(target).startswith(os.path.realpath(path) + os.sep)
            assert target.read_bytes() == content.encode("utf-8")
        assert snapshot(outside) == before

    write()


def test_symlink_names_stay_inside(tmp_path: Path) -> None:
    storage, account, path, outside = setup(tmp_path)
    before = snapshot(outside)
    source = str(outside / "secret.txt")

    @SETTINGS
    @given(name=names)
    def link(name: str) -> None:
        try:
            asyncio.run(storage.write_files(path, account, [],
                                            [SymlinkSpec(name=name, source_path=source)]))
        except InvalidRequest as exc:
            assert refused_properly(exc, name, "Invalid symlink destination path specified {}")
        else:
            parts = [p for p in name.split("/") if p not in ("", ".")]
            created = Path(path, *parts)
            assert created.is_symlink() and os.readlink(created) == source
            # The link itself lies in a real directory of the workspace.
            assert os.path.realpath(created.parent) == os.path.normpath(created.parent)
            assert str(created.parent).startswith(path)
        assert snapshot(outside) == before

    link()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def test_uploads_stay_inside(tmp_path: Path) -> None:
    storage, account, path, outside = setup(tmp_path)
    before = snapshot(outside)

    @SETTINGS
    @given(filename=names, data=st.binary(max_size=64))
    def upload(filename: str, data: bytes) -> None:
        try:
            asyncio.run(storage.save_upload(path, account, filename, _chunks(data)))
        except InvalidRequest as exc:
            assert exc.user_message == f"Invalid file path specified {filename}", exc
        else:
            # Only the final component counts, in the workspace root.
            name = filename.replace("\\", "/").rsplit("/", 1)[-1]
            target = Path(path, name)
            assert not target.is_symlink() and target.read_bytes() == data
        assert snapshot(outside) == before
        leftovers = [n for n in os.listdir(path) if n.startswith(".uws-upload-")]
        assert leftovers == []

    upload()


def test_scan_reads_nothing_outside(tmp_path: Path) -> None:
    storage, _, path, outside = setup(tmp_path)
    (outside / "deep").mkdir()
    (outside / "deep" / "more.txt").write_text("x")
    scan = asyncio.run(storage.scan(path))
    listed = [*scan.files, *scan.symlinks]
    assert not any("secret" in name or "deep" in name for name in listed), listed
    assert {"/out", "/outfile"} <= set(listed)
