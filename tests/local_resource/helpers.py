"""Shared helpers of the LocalResource tests: the resource as they configure it (multi-user,
its state and sessions directories under a given root), the ``Env`` a test works in, and
looks at real processes through /proc.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controllers.auth.accounts import AccountSettings
from controllers.auth.local import LocalUserAuthentication
from controllers.base import ExternalAccount, LaunchRequest
from controllers.resources.local import LocalResource

ROOT = Path(__file__).resolve().parents[2]
WAIT_LIMIT_S = 30.0
GRACE_S = 1.0  # the resource's stop grace: TERM, then KILL this long after


# --- resources, requests -------------------------------------------------------------


def multi_user_auth() -> LocalUserAuthentication:
    auth = LocalUserAuthentication("local_auth", AccountSettings(accounts="multi_user"))
    assert not auth.serves_one_person
    return auth


def resource_settings(root: Path) -> dict[str, Any]:
    return {"state_dir": str(root / "local-jobs"), "sessions_dir": str(root / "sessions"),
            "stop_grace_seconds": GRACE_S}


def make_resource(root: Path, **mapping: str) -> LocalResource:
    # Storage is not used by this resource.
    return LocalResource(
        "local", LocalResource.Settings(**resource_settings(root)),
        storage=None, auth=multi_user_auth(),  # type: ignore[arg-type]
        passthrough_domain="localhost", parameter_mapping=mapping,
    )


@dataclass
class Env:
    root: Path
    workspace: Path  # the account's own directory, where its jobs' workdirs go
    resource: LocalResource
    account: ExternalAccount
    handles: list[dict[str, Any]] = field(default_factory=list)

    def workdir(self, job_id: int) -> Path:
        return self.workspace / f"job-{job_id}"

    def request(self, script: str, job_id: int = 1, *,
                account: ExternalAccount | None = None, **extra: Any) -> LaunchRequest:
        return LaunchRequest(job_id=job_id, script=script, workdir=str(self.workdir(job_id)),
                             account=account or self.account, **extra)

    async def launch(self, request: LaunchRequest,
                     resource: LocalResource | None = None) -> dict[str, Any]:
        handle = await (resource or self.resource).launch(request)
        self.handles.append(handle)
        return handle


# --- processes ----------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat, or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def parent_pid(pid: int) -> int:
    fields = proc_stat(pid)
    assert fields is not None
    return int(fields[1])


def owner_uid(pid: int) -> int:
    return Path(f"/proc/{pid}").stat().st_uid


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def eventually(check: Callable[[], bool], limit: float = WAIT_LIMIT_S) -> bool:
    """Whether ``check`` turns true within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def pids_written(workdir: Path, *names: str) -> dict[str, int]:
    """The pids the job wrote into ``names`` (once each file holds one)."""
    def written() -> bool:
        return all((workdir / n).exists() and (workdir / n).read_text().strip().isdigit()
                   for n in names)
    assert await eventually(written), sorted(p.name for p in workdir.iterdir())
    return {n: int((workdir / n).read_text()) for n in names}


def job_log(workdir: Path) -> str:
    path = workdir / "job.log"
    return path.read_text() if path.exists() else ""
