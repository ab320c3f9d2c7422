"""LocalResource against real processes: launch, poll, wait, stop, restarts of the launcher."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import pwd
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from controllers.base import ExternalAccount, JobContext, LaunchRequest
from controllers.errors import BackendError, InvalidRequest
from controllers.job_types.local_test import LocalTestJob
from controllers.resources.local import LocalResource

ROOT = Path(__file__).resolve().parents[2]
WAIT_LIMIT_S = 30.0


def make_resource(**mapping: str) -> LocalResource:
    # Storage and auth are not used by this resource.
    return LocalResource(
        "local", LocalResource.Settings(), storage=None, auth=None,  # type: ignore[arg-type]
        passthrough_domain="localhost", parameter_mapping=mapping,
    )


def make_request(workdir: Path, script: str, job_id: int = 1, **extra: Any) -> LaunchRequest:
    return LaunchRequest(job_id=job_id, script=script, workdir=str(workdir),
                         account=ExternalAccount(username=getpass.getuser()), **extra)


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat, or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return None


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def parent_pid(pid: int) -> int:
    fields = proc_stat(pid)
    assert fields is not None
    return int(fields[1])


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


@pytest.fixture
def resource() -> LocalResource:
    return make_resource()


@pytest.fixture
async def started(resource: LocalResource) -> AsyncIterator[list[dict[str, Any]]]:
    """Handles to stop at the end, so no test leaves a process behind."""
    handles: list[dict[str, Any]] = []
    yield handles
    for handle in handles:
        await resource.stop(handle, 1.0)


async def launch(resource: LocalResource, started: list[dict[str, Any]],
                 request: LaunchRequest) -> dict[str, Any]:
    handle = await resource.launch(request)
    started.append(handle)
    return handle


# --- running to the end ---------------------------------------------------------------


async def test_test_job_runs_to_complete(resource, started, tmp_path):
    job = LocalTestJob("local_test", {"local": LocalTestJob.Settings(duration_seconds=0.5)})
    ctx = JobContext(job_id=41, workdir=str(tmp_path), resource_name="local",
                     passthrough_domain="localhost")
    handle = await launch(resource, started, make_request(tmp_path, job.script(ctx), 41))

    assert handle["id"] == handle["pgid"] == resource.resource_job_id(handle)
    assert json.loads(json.dumps(handle)) == handle
    running = await resource.poll(handle)
    assert running.status == "running"
    assert running.hostname == "127.0.0.1"

    began = time.monotonic()
    state = await resource.wait(handle, WAIT_LIMIT_S)
    assert time.monotonic() - began < WAIT_LIMIT_S  # told of the exit, not timed out
    assert (state.status, state.exit_code) == ("complete", 0)
    assert state.core_hours is not None and state.core_hours > 0
    assert "41" in (tmp_path / "test_job_output.txt").read_text()


async def test_failing_script_reads_failed_with_its_exit_code(resource, started, tmp_path):
    handle = await launch(resource, started, make_request(tmp_path, "echo oops >&2\nexit 3\n"))
    state = await resource.wait(handle, WAIT_LIMIT_S)
    assert (state.status, state.exit_code, state.detail) == ("failed", 3, "exit code 3")
    assert "oops" in (tmp_path / "job.log").read_text()
    # Polling after the end keeps answering the same.
    assert (await resource.poll(handle)).exit_code == 3


async def test_wait_times_out_on_a_running_job(resource, started, tmp_path):
    handle = await launch(resource, started, make_request(tmp_path, "sleep 1000\n"))
    began = time.monotonic()
    state = await resource.wait(handle, 0.5)
    assert time.monotonic() - began >= 0.5
    assert state.status == "running"


async def test_job_environment_is_the_requests_not_the_workers(
        resource, started, tmp_path, monkeypatch):
    monkeypatch.setenv("UWS_WORKER_SECRET", "do-not-leak")
    script = "env > env.txt\n"
    request = make_request(tmp_path, script, 7, env={"FOO": "bar baz"})
    state = await resource.wait(await launch(resource, started, request), WAIT_LIMIT_S)
    assert state.status == "complete"
    env = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines()
               if "=" in line)
    assert env["FOO"] == "bar baz"
    assert env["UWS_JOB_ID"] == "7"
    assert env["USER"] == getpass.getuser()
    assert "HOME" in env
    assert "UWS_WORKER_SECRET" not in env


async def test_num_cpus_follows_the_parameter_mapping(started, tmp_path):
    resource = make_resource(num_cpus="cores")
    request = make_request(tmp_path, "true\n", resource_options={"cores": 4})
    handle = await launch(resource, started, request)
    assert handle["cpus"] == 4
    with pytest.raises(InvalidRequest):
        await resource.launch(make_request(tmp_path / "x", "true\n", 2,
                                           resource_options={"cores": "many"}))


async def test_health(resource):
    assert (await resource.health()).ok


# --- launching once -------------------------------------------------------------------


COUNTING_SCRIPT = "echo started >> starts.txt\nsleep 0.5\n"


async def test_repeated_launch_returns_the_first_handle(resource, started, tmp_path):
    request = make_request(tmp_path, COUNTING_SCRIPT, 5)
    first = await launch(resource, started, request)
    again = await resource.launch(request)
    # Concurrent retries, and a fresh resource as after a worker restart.
    both = await asyncio.gather(resource.launch(request), make_resource().launch(request))
    assert again == first
    assert list(both) == [first, first]

    assert (await resource.wait(first, WAIT_LIMIT_S)).status == "complete"
    assert (await resource.launch(request)) == first  # even once it has ended
    assert (tmp_path / "starts.txt").read_text().splitlines() == ["started"]


async def test_concurrent_first_launches_start_one_process(resource, started, tmp_path):
    request = make_request(tmp_path, COUNTING_SCRIPT, 6)
    handles = await asyncio.gather(*(make_resource().launch(request) for _ in range(4)))
    started.append(handles[0])
    assert all(handle == handles[0] for handle in handles)
    await resource.wait(handles[0], WAIT_LIMIT_S)
    assert (tmp_path / "starts.txt").read_text().splitlines() == ["started"]


async def test_launch_adopts_a_started_job_without_record(resource, started, tmp_path):
    # As if the launching worker died after the wrapper wrote its pid, before the record.
    request = make_request(tmp_path, COUNTING_SCRIPT, 8)
    first = await launch(resource, started, request)
    (tmp_path / ".uws-launch.json").unlink()
    adopted = await resource.launch(request)
    assert adopted["id"] == first["id"]
    assert adopted["start_ticks"] == first["start_ticks"]
    await resource.wait(adopted, WAIT_LIMIT_S)
    assert (tmp_path / "starts.txt").read_text().splitlines() == ["started"]


async def test_another_job_in_the_same_workdir(resource, started, tmp_path):
    running = await launch(resource, started, make_request(tmp_path, "sleep 1000\n", 10))
    with pytest.raises(BackendError):
        await resource.launch(make_request(tmp_path, "true\n", 11))
    await resource.stop(running, 1.0)
    # Once the first has ended, a new job may use the directory, and its state is its own.
    second = await launch(resource, started, make_request(tmp_path, "exit 0\n", 11))
    assert second["id"] != running["id"]
    assert (await resource.wait(second, WAIT_LIMIT_S)).status == "complete"


# --- stopping and dying ---------------------------------------------------------------


GROUP_SCRIPT = """\
bash -c 'sleep 1000 & echo $! > grandchild.pid; wait' &
sleep 1000
"""


async def test_stop_ends_the_whole_group(resource, started, tmp_path):
    handle = await launch(resource, started, make_request(tmp_path, GROUP_SCRIPT))
    pid_file = tmp_path / "grandchild.pid"
    assert await eventually(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
    grandchild = int(pid_file.read_text())
    assert is_running(grandchild)

    await resource.stop(handle, 5.0)
    assert await eventually(lambda: not is_running(grandchild))
    assert not is_running(handle["id"])
    state = await resource.poll(handle)
    # The wrapper trapped the TERM and recorded it; whether that is "failed" or
    # "cancelled" for the user is the caller's decision.
    assert (state.status, state.exit_code) == ("failed", 143)

    await resource.stop(handle, 5.0)  # a second stop is quiet
    assert (await resource.poll(handle)).exit_code == 143


async def test_term_to_the_wrapper_alone_reaches_the_job(resource, started, tmp_path):
    script = "sleep 1000 &\necho $! > child.pid\nwait\n"
    handle = await launch(resource, started, make_request(tmp_path, script))
    pid_file = tmp_path / "child.pid"
    assert await eventually(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
    os.kill(handle["id"], signal.SIGTERM)
    state = await resource.wait(handle, WAIT_LIMIT_S)
    assert (state.status, state.exit_code) == ("failed", 143)
    # The wrapper forwarded the TERM to job.sh and recorded only once that had ended.
    assert not is_running(handle["id"])


async def test_stop_kills_a_job_that_ignores_term(resource, started, tmp_path):
    script = "trap '' TERM\nwhile :; do sleep 0.1; done\n"
    handle = await launch(resource, started, make_request(tmp_path, script))
    await resource.stop(handle, 1.0)
    assert await eventually(lambda: not is_running(handle["id"]))
    assert (await resource.poll(handle)).status == "failed"


async def test_stop_of_an_ended_job_is_quiet(resource, started, tmp_path):
    handle = await launch(resource, started, make_request(tmp_path, "exit 0\n"))
    await resource.wait(handle, WAIT_LIMIT_S)
    await resource.stop(handle, 1.0)
    assert (await resource.poll(handle)).status == "complete"


async def test_killed_wrapper_reads_failed_not_running(resource, started, tmp_path):
    handle = await launch(resource, started, make_request(tmp_path, "sleep 1000\n"))
    os.kill(handle["id"], signal.SIGKILL)
    state = await resource.wait(handle, WAIT_LIMIT_S)
    assert state.status == "failed"
    assert state.exit_code is None
    assert state.detail == "process ended without an exit status"
    assert not (tmp_path / ".uws-exit").exists()
    # The orphaned job is still in the group: stop ends it (its zombie is reaped by init).
    assert group_exists(handle["pgid"])
    await resource.stop(handle, 1.0)
    assert await eventually(lambda: not group_exists(handle["pgid"]))


async def test_a_reused_pid_is_never_ours(resource, tmp_path):
    # A handle whose pid now names another process (here: this test) with other ticks.
    handle = {"id": os.getpid(), "pgid": os.getpgid(0), "start_ticks": -5,
              "workdir": str(tmp_path), "job_id": 1, "cpus": 1,
              "hostname": "127.0.0.1", "started_at": time.time()}
    assert (await resource.poll(handle)).status == "failed"
    assert (await resource.wait(handle, WAIT_LIMIT_S)).status == "failed"
    await resource.stop(handle, 0.1)  # must not signal us: we are still here to assert
    assert is_running(os.getpid())


LAUNCHER = """\
import asyncio, json, sys, time
from controllers.base import LaunchRequest
from controllers.resources.local import LocalResource

resource = LocalResource("local", LocalResource.Settings(), storage=None, auth=None,
                         passthrough_domain="localhost", parameter_mapping={})
handle = asyncio.run(resource.launch(LaunchRequest.model_validate_json(sys.argv[1])))
print(json.dumps(handle), flush=True)
if sys.argv[2] == "linger":
    time.sleep(1000)
"""


@pytest.mark.parametrize("launcher_end", ["exit", "sigkill"])
async def test_job_survives_the_launching_process(resource, started, tmp_path, launcher_end):
    request = make_request(tmp_path, "sleep 1000\n")
    mode = "linger" if launcher_end == "sigkill" else "exit"
    launcher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER, request.model_dump_json(), mode,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.PIPE,
    )
    assert launcher.stdout is not None
    handle = json.loads(await launcher.stdout.readline())
    started.append(handle)
    if launcher_end == "sigkill":
        launcher.kill()
    assert await launcher.wait() == (-signal.SIGKILL if launcher_end == "sigkill" else 0)

    state = await resource.poll(handle)
    assert state.status == "running"
    assert parent_pid(handle["id"]) not in (launcher.pid, os.getpid())
    assert os.getsid(handle["id"]) == handle["id"] != os.getsid(0)

    await resource.stop(handle, 5.0)
    assert (await resource.poll(handle)).status == "failed"


# --- running as the account -----------------------------------------------------------


def nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.mark.skipif(os.geteuid() != 0 or nobody() is None, reason="needs root and 'nobody'")
async def test_job_runs_as_the_account(resource, started):
    account = nobody()
    assert account is not None
    # Under /tmp, not tmp_path: the account must be able to reach the directory.
    workdir = Path(tempfile.mkdtemp(prefix="uws-local-"))
    try:
        request = LaunchRequest(
            job_id=3, script="id -u > uid.txt\n", workdir=str(workdir),
            account=ExternalAccount(username="nobody", uid=account.pw_uid),
        )
        state = await resource.wait(await launch(resource, started, request), WAIT_LIMIT_S)
        assert state.status == "complete"
        assert (workdir / "uid.txt").read_text().strip() == str(account.pw_uid)
        assert os.stat(workdir).st_uid == account.pw_uid
    finally:
        shutil.rmtree(workdir)
