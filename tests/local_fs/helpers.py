"""Plain helpers for LocalFileSystemStorage's tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from controllers.storage.local_fs import LocalFileSystemStorage

LONG_COMPONENT = "x" * 256
LONG_PATH = "/".join(["d" * 200] * 21)  # every component fine, the whole > 4096 bytes


def make_storage(root: Path, **settings: object) -> LocalFileSystemStorage:
    return LocalFileSystemStorage(
        "local", LocalFileSystemStorage.Settings(root_dir=str(root), **settings)
    )


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
