"""Fixtures for LocalFileSystemStorage's tests: a storage rooted in a real tmp dir, a
directory outside it holding a secret, an account (the test's own uid) and one workspace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controllers.base import ExternalAccount
from controllers.storage.local_fs import LocalFileSystemStorage
from tests.local_fs.helpers import make_storage


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
