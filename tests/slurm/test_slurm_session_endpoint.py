"""Where a Slurm session listens, decided by the server before submission (no cluster
needed): a socket in a 0700 directory of the owner's, the token written by the server,
and a JupyterLab script whose base URL and socket are that choice."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from controllers.base import ExternalAccount, JobContext
from controllers.errors import BackendError
from controllers.job_types.jupyter_lab import JupyterLabJob, read_token
from controllers.resources.slurm.sessions import SessionDirs
from tests.conftest import throwaway_account


@pytest.fixture
def account() -> Iterator[ExternalAccount]:
    if os.geteuid() != 0:
        pytest.skip("creates an OS account")
    yield from throwaway_account()


def test_session_directory_is_the_owners(account: ExternalAccount, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    dirs = SessionDirs(str(root), "node7")
    dirs.make(41, account)
    endpoint = dirs.endpoint(41, account)
    assert endpoint.socket_path == str(root / "41" / "session.sock")
    assert (endpoint.owner_uid, endpoint.hostname) == (account.uid, "node7")
    info = os.stat(root / "41")
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (account.uid, 0o700)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o711
    token = Path(endpoint.token_file)
    assert (token.stat().st_uid, stat.S_IMODE(token.stat().st_mode)) == (account.uid, 0o600)
    first = read_token(endpoint)
    assert first == token.read_text()
    dirs.make(41, account)  # prepared again: the (maybe running) session keeps its token
    assert read_token(endpoint) == first
    token.unlink()
    dirs.make(41, account)  # one left unfinished starts clean, with a new token
    assert read_token(endpoint) not in (None, first)
    dirs.remove(41)
    assert not (root / "41").exists()


def test_root_never_owns_a_session() -> None:
    dirs = SessionDirs("/tmp/x", "n")
    with pytest.raises(BackendError):
        dirs.endpoint(1, ExternalAccount(username="root", uid=0, gid=0))


def test_jupyter_script_uses_the_servers_choice(account: ExternalAccount,
                                                tmp_path: Path) -> None:
    endpoint = SessionDirs(str(tmp_path / "s"), "node7").endpoint(9, account)
    ctx = JobContext(job_id=9, workdir=str(tmp_path), resource_name="slurm_resource",
                     passthrough_domain="", session=endpoint)
    script = JupyterLabJob("jupyter_lab", {}).script(ctx)
    assert f"--ServerApp.sock={endpoint.socket_path}" in script
    assert "--ServerApp.base_url=/passthrough/node7/9/" in script
    assert endpoint.token_file in script and "--port" not in script
