"""Fixtures of the LocalResource tests.

The resource runs multi-user, as the test config does: each job as a real throwaway OS
account (made here, removed at the end). Its state and sessions directories and the
account's workspace are under ``traversable_dir`` (pytest's tmp dirs are 0700 root: the
account could not reach them). Each test has a resource of its own, so job ids may repeat.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator

import pytest

from controllers.base import ExternalAccount
from tests.conftest import (
    stop_leftover_jobs,
    throwaway_account,
    traversable_dir,
)
from tests.local_resource.helpers import Env, make_resource


# Per test: each test's accounts are fresh (and a uid is never shared by the two).
@pytest.fixture
def account() -> Iterator[ExternalAccount]:
    """The account the jobs run as."""
    yield from throwaway_account()


@pytest.fixture
def stranger(account: ExternalAccount) -> Iterator[ExternalAccount]:
    """Another user's account."""
    for other in throwaway_account():
        assert other.uid != account.uid
        yield other


@pytest.fixture
async def env(account: ExternalAccount) -> AsyncIterator[Env]:
    root = traversable_dir("uws-local-")
    workspace = root / "ws"
    workspace.mkdir(mode=0o700)
    os.chown(workspace, account.uid, account.gid)  # type: ignore[arg-type]
    resource = make_resource(root)
    await resource.prepare()
    env = Env(root, workspace, resource, account)
    try:
        yield env
    finally:
        # No test leaves a process behind: every handle, then whatever else was started.
        for handle in env.handles:
            await resource.stop(handle, 1.0)
        await stop_leftover_jobs(resource, root)
        shutil.rmtree(root, ignore_errors=True)
