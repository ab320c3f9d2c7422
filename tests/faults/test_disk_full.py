"""The workspace file system fills up during an upload and during a share's copy.

The storage root is an 8 MiB tmpfs (mounting needs root; without it the module skips).
An upload that does not fit answers 507 Insufficient Storage in the contract's envelope:
the request was fine and within every limit the server sets (that would be 413); the
server could not store it (RFC 4918, 11.5). A copy that does not fit ends the share in
``error`` with that reason. Neither leaves a partial or temporary file behind, and the
usage numbers match what is on disk (a copy not yet accepted counts for its sender)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import traversable_dir
from tests.faults.helpers import db_fetch, eventually, new_user, new_workspace
from tests.stack import TESTS, Stack

pytestmark = [pytest.mark.faults, pytest.mark.slow]

CONFIG = TESTS / "data" / "faults-small-disk.toml"
NO_SPACE = "Not enough space left on the storage to save this upload."


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("disk-full")
    # The users' OS accounts pass through the data dir to their workspaces: not under
    # pytest's 0700 tmp dirs. The small disk's root as the storage makes its root (0755),
    # not tmpfs's default world-writable 1777.
    data = traversable_dir("uws-disk-full-data-")
    disk = data / "small-disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs",
                            str(disk)], capture_output=True, text=True)
    if mount.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        pytest.skip(f"cannot mount a small tmpfs here ({mount.stderr.strip()}): "
                    "disk-full faults not tested")
    s = Stack(base, apis=1, workers=1, config=CONFIG, data_dir=data)
    try:
        yield s.start()
    finally:
        s.close()
        subprocess.run(["umount", "-l", str(disk)], check=False)
        shutil.rmtree(data, ignore_errors=True)


def _entries(path: Path) -> dict[str, int]:
    """Every file under ``path`` (dot-directories of jobs aside) and its size."""
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*")
            if p.is_file() and ".jobs" not in p.parts}


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def _workspace(stack: Stack, workspace_id: int) -> dict:
    rows = await db_fetch(stack, "SELECT file_path, disk_space, status, status_reason "
                          "FROM uws_workspace WHERE id = $1", workspace_id)
    return dict(rows[0])


async def _used(http: httpx.AsyncClient) -> int:
    r = await http.get("/users/me/quota/")
    assert r.status_code == 200, r.text
    return r.json()["data"]["quota"]["used_disk_space"]


async def _upload(http: httpx.AsyncClient, workspace_id: int, name: str,
                  size: int) -> httpx.Response:
    return await http.put(f"/workspaces/{workspace_id}/upload/",
                          files={"file": (name, os.urandom(size))})


async def test_upload_fills_the_disk(stack: Stack, client_key: str) -> None:
    user = await new_user(stack, client_key)
    async with user.http() as http:
        ws = await new_workspace(http, "upload")
        path = Path((await _workspace(stack, ws))["file_path"])
        free = _free(path)
        r = await _upload(http, ws, "too-big.bin", free + 1024 * 1024)
        print(f"upload larger than the free {free} bytes: {r.status_code} {r.text}")
        assert r.status_code == 507, r.text
        assert r.json() == {"success": False, "message": NO_SPACE}
        assert os.listdir(path) == [], os.listdir(path)  # no partial, no temporary file
        assert _free(path) == free
        assert await _used(http) == 0

        # The space is back: a smaller upload fits, and the usage counts it.
        r = await _upload(http, ws, "fits.bin", 1024 * 1024)
        assert r.status_code == 200, r.text

        async def counted() -> bool:
            return await _used(http) == sum(_entries(path).values()) == 1024 * 1024

        await eventually(counted, 30, what="usage after the upload")


async def test_share_copy_fills_the_disk(stack: Stack, client_key: str) -> None:
    sender = await new_user(stack, client_key)
    recipient = await new_user(stack, client_key)
    async with sender.http() as http:
        ws = await new_workspace(http, "to-share")
        path = Path((await _workspace(stack, ws))["file_path"])
        # Four files filling ~70% of what is free: the copy gets some in, then runs out.
        part = int(_free(path) * 0.7) // 4
        for i in range(4):
            r = await _upload(http, ws, f"part{i}.bin", part)
            assert r.status_code == 200, r.text
        r = await http.post("/shared_workspaces/", json={"original_workspace_id": ws,
                                                         "shared_user_ids": [recipient.id]})
        assert r.status_code == 200, r.text
        copy_id = r.json()["data"]["shared_workspaces"][0]["shared_workspace_id"]["id"]

    async def failed() -> dict | None:
        row = await _workspace(stack, copy_id)
        return row if row["status"] == "error" else None

    row = await eventually(failed, 60, what="the share's copy in error")
    copy = Path(row["file_path"])
    on_disk = _entries(copy)
    print(f"share copy: status={row['status']} reason={row['status_reason']!r} "
          f"files on disk={on_disk} disk_space={row['disk_space']}")
    assert "space" in row["status_reason"], row
    assert not [n for n in os.listdir(copy) if n.endswith(".part")], os.listdir(copy)
    assert _entries(path) == {f"part{i}.bin": part for i in range(4)}  # the original intact
    # Not accepted, the copy is charged to its sender (db.quotas), not to the recipient.
    async with sender.http() as http:
        async def counted() -> bool:
            return await _used(http) == sum(_entries(path).values()) + sum(on_disk.values())

        await eventually(counted, 30, what="the sender's usage matching the disk")
    async with recipient.http() as http:
        assert await _used(http) == 0
