"""LocalResource against real processes, through its public API: launch, poll, wait, stop,
sessions, and restarts or crashes of the launcher.

The resource runs multi-user, as the test config does: an auth whose ``serves_one_person``
is False, and each job as a real throwaway OS account (made here, removed at the end) in a
network namespace of its own. Its state and sessions directories and the account's
workspace are under ``traversable_dir`` (pytest's tmp dirs are 0700 root: the account
could not reach them). Each test has a resource of its own, so job ids may repeat.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from controllers.auth.accounts import AccountSettings
from controllers.auth.local import LocalUserAuthentication
from controllers.base import ExternalAccount, JobContext, LaunchRequest
from controllers.errors import BackendError, InvalidRequest
from controllers.job_types.local_test import LocalTestJob
from controllers.resources.local import LocalResource
from controllers.resources.local.launcher import launcher_for
from tests.conftest import (
    stop_leftover_jobs,
    throwaway_account,
    traversable_dir,
)

ROOT = Path(__file__).resolve().parents[2]
WAIT_LIMIT_S = 30.0
GRACE_S = 1.0  # the resource's stop grace: TERM, then KILL this long after


# --- accounts, resources, requests ----------------------------------------------------


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


# --- running to the end -----------------------------------------------------------------


async def test_test_job_runs_to_complete(env: Env):
    job = LocalTestJob("local_test", {"local": LocalTestJob.Settings(duration_seconds=0.5)})
    workdir = env.workdir(41)
    ctx = JobContext(job_id=41, workdir=str(workdir), resource_name="local",
                     passthrough_domain="localhost")
    handle = await env.launch(env.request(job.script(ctx), 41))

    assert handle["id"] == handle["pgid"] == env.resource.resource_job_id(handle)
    assert json.loads(json.dumps(handle)) == handle
    running = await env.resource.poll(handle)
    assert running.status == "running"
    assert running.hostname == "127.0.0.1"

    began = time.monotonic()
    state = await env.resource.wait(handle, WAIT_LIMIT_S)
    assert time.monotonic() - began < WAIT_LIMIT_S  # told of the exit, not timed out
    assert (state.status, state.exit_code) == ("complete", 0), job_log(workdir)
    assert state.core_hours is not None and state.core_hours > 0
    output = workdir / "test_job_output.txt"
    assert "41" in output.read_text()
    assert output.stat().st_uid == env.account.uid  # written by the job, as the account


async def test_failing_script_reads_failed_with_its_exit_code(env: Env):
    handle = await env.launch(env.request("echo oops >&2\nexit 3\n"))
    state = await env.resource.wait(handle, WAIT_LIMIT_S)
    assert (state.status, state.exit_code, state.detail) == ("failed", 3, "exit code 3")
    assert "oops" in job_log(env.workdir(1))
    # Polling after the end keeps answering the same.
    assert (await env.resource.poll(handle)).exit_code == 3


async def test_wait_times_out_on_a_running_job(env: Env):
    handle = await env.launch(env.request("sleep 1000\n"))
    began = time.monotonic()
    state = await env.resource.wait(handle, 0.5)
    assert time.monotonic() - began >= 0.5
    assert state.status == "running"


async def test_exit_code_and_core_hours_are_measured_by_the_server(env: Env):
    request = env.request("sleep 1\nexit 5\n", resource_options={"num_cpus": 2})
    before = time.time()
    handle = await env.launch(request)
    assert before <= handle["started_at"] <= time.time()
    assert handle["cpus"] == 2

    running = await env.resource.poll(handle)
    assert running.status == "running"
    assert 0 <= running.core_hours <= 2 * (time.time() - before) / 3600

    state = await env.resource.wait(handle, WAIT_LIMIT_S)
    assert (state.status, state.exit_code, state.detail) == ("failed", 5, "exit code 5")
    elapsed = state.core_hours * 3600 / 2  # two CPUs granted
    assert 1.0 <= elapsed <= time.time() - before
    # The end is the measured one: the count does not grow once the job has ended.
    await asyncio.sleep(0.3)
    assert (await env.resource.poll(handle)).core_hours == state.core_hours


async def test_a_job_killed_by_a_signal_reads_128_plus_the_signal(env: Env):
    handle = await env.launch(env.request("kill -KILL $$\n"))
    state = await env.resource.wait(handle, WAIT_LIMIT_S)
    assert (state.status, state.exit_code, state.detail) == ("failed", 137, "exit code 137")


async def test_job_environment_is_the_requests_not_the_workers(env: Env, monkeypatch):
    monkeypatch.setenv("UWS_WORKER_SECRET", "do-not-leak")
    request = env.request("env > env.txt\n", 7, env={"FOO": "bar baz"})
    state = await env.resource.wait(await env.launch(request), WAIT_LIMIT_S)
    assert state.status == "complete", job_log(env.workdir(7))
    lines = (env.workdir(7) / "env.txt").read_text().splitlines()
    job_env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert job_env["FOO"] == "bar baz"
    assert job_env["UWS_JOB_ID"] == "7"
    assert job_env["USER"] == job_env["LOGNAME"] == env.account.username
    assert job_env["HOME"] == env.account.home
    assert "UWS_WORKER_SECRET" not in job_env


async def test_num_cpus_follows_the_parameter_mapping(env: Env):
    resource = make_resource(env.root, num_cpus="cores")
    handle = await env.launch(env.request("true\n", resource_options={"cores": 4}), resource)
    assert handle["cpus"] == 4
    assert (await env.launch(env.request("true\n", 2), resource))["cpus"] == 1  # default
    for bad in ("many", 0):
        with pytest.raises(InvalidRequest):
            await resource.launch(env.request("true\n", 3, resource_options={"cores": bad}))
    assert not env.workdir(3).exists()  # nothing was started


async def test_a_job_that_cannot_start_reads_failed_with_the_reason(env: Env):
    # The account may not create its workdir here (root's directory): the job never runs.
    blocked = env.root / "roots"
    blocked.mkdir(mode=0o755)
    request = LaunchRequest(job_id=9, script="echo ran > ran.txt\n",
                            workdir=str(blocked / "job"), account=env.account)
    state = await env.resource.wait(await env.launch(request), WAIT_LIMIT_S)
    assert (state.status, state.exit_code) == ("failed", 127)
    assert state.detail.startswith("could not start the job: PermissionError"), state.detail
    assert not (blocked / "job").exists()


async def test_health_and_preparation(env: Env):
    assert env.resource.isolated
    assert (await env.resource.health()).ok
    await env.resource.prepare()  # idempotent
    state_root, sessions_root = env.root / "local-jobs", env.root / "sessions"
    assert stat.S_IMODE(state_root.stat().st_mode) == 0o700
    assert stat.S_IMODE(sessions_root.stat().st_mode) == 0o711
    assert state_root.stat().st_uid == sessions_root.stat().st_uid == os.geteuid()


async def test_a_sessions_dir_too_long_for_a_socket_is_refused(env: Env):
    settings = {**resource_settings(env.root), "sessions_dir": str(env.root / ("s" * 100))}
    resource = LocalResource("local", LocalResource.Settings(**settings), storage=None,  # type: ignore[arg-type]
                             auth=multi_user_auth(), passthrough_domain="localhost",
                             parameter_mapping={})
    with pytest.raises(RuntimeError, match="too long for a Unix socket"):
        await resource.prepare()


async def test_a_handle_of_an_older_version_reads_failed(env: Env):
    old = {"id": 123456, "pgid": 123456, "start_ticks": 1, "workdir": str(env.workspace),
           "job_id": 1, "cpus": 1, "hostname": "127.0.0.1", "started_at": time.time()}
    state = await env.resource.poll(old)
    assert (state.status, state.detail) == ("failed", "launched by an older version of uws")
    await env.resource.stop(old, 0.1)  # quiet


# --- the account and its isolation ----------------------------------------------------


async def test_job_runs_as_the_account_in_its_own_network_namespace(env: Env):
    listener = socket.create_server(("127.0.0.1", 0))  # a port of the host's loopback
    port = listener.getsockname()[1]
    script = (
        "id -u > uid.txt\nid -g > gid.txt\nid -G > groups.txt\n"
        "readlink /proc/self/ns/net > netns.txt\n"
        f"(echo hi > /dev/tcp/127.0.0.1/{port}) 2> tcp.err && echo reached > tcp.txt\n"
        "exit 0\n"
    )
    try:
        state = await env.resource.wait(await env.launch(env.request(script)), WAIT_LIMIT_S)
    finally:
        listener.close()
    workdir = env.workdir(1)
    assert state.status == "complete", job_log(workdir)
    account = env.account
    assert (workdir / "uid.txt").read_text().split() == [str(account.uid)]
    assert (workdir / "gid.txt").read_text().split() == [str(account.gid)]
    assert (workdir / "groups.txt").read_text().split() == [str(account.gid)]  # its own only
    assert (workdir / "netns.txt").read_text().strip() != os.readlink("/proc/self/ns/net")
    assert not (workdir / "tcp.txt").exists()  # the host's loopback is out of reach
    # The job's directory and files are the account's, private to it.
    for path, mode in ((workdir, 0o700), (workdir / "job.log", 0o600),
                       (workdir / "job.sh", 0o700)):
        info = path.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (account.uid, mode), path


@pytest.mark.parametrize("who", ["root", "service", "no uid", "root group"])
async def test_launch_refuses_accounts_that_are_not_a_users_own(env: Env, who: str):
    accounts = {
        "root": ExternalAccount(username="root", uid=0, gid=0),
        "service": ExternalAccount(username="svc", uid=os.geteuid(), gid=os.getegid()),
        "no uid": ExternalAccount(username=env.account.username),
        "root group": env.account.model_copy(update={"gid": 0}),
    }
    with pytest.raises(BackendError):
        await env.resource.launch(env.request("touch ran\n", 4, account=accounts[who]))
    assert not env.workdir(4).exists()  # nothing ran


# --- launching once -----------------------------------------------------------------------


COUNTING_SCRIPT = "echo started >> starts.txt\nsleep 0.5\n"


def starts(workdir: Path) -> list[str]:
    return (workdir / "starts.txt").read_text().splitlines()


async def test_repeated_launch_returns_the_first_handle(env: Env):
    request = env.request(COUNTING_SCRIPT, 5)
    first = await env.launch(request)
    again = await env.resource.launch(request)
    # Concurrent retries, and a fresh resource as after a worker restart.
    both = await asyncio.gather(env.resource.launch(request),
                                make_resource(env.root).launch(request))
    assert again == first
    assert list(both) == [first, first]

    assert (await env.resource.wait(first, WAIT_LIMIT_S)).status == "complete"
    assert (await env.resource.launch(request)) == first  # even once it has ended
    assert (await env.resource.poll(first)).status == "complete"
    assert starts(env.workdir(5)) == ["started"]


LAUNCHER = """\
import asyncio, json, os, signal, sys, time
from controllers.auth.accounts import AccountSettings
from controllers.auth.local import LocalUserAuthentication
from controllers.base import LaunchRequest
from controllers.resources.local import LocalResource
from controllers.resources.local.launcher import launcher_for

settings, request, mode = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
resource = LocalResource(
    "local", LocalResource.Settings(**settings), storage=None,
    auth=LocalUserAuthentication("local_auth", AccountSettings(accounts="multi_user")),
    passthrough_domain="localhost", parameter_mapping={})
if mode == "crash":
    # The worker dies right after starting the supervisor, before reading started.json.
    start = LocalResource._start_supervisor
    def start_then_die(self, job_id, state):
        start(self, job_id, state)
        os.kill(os.getpid(), signal.SIGKILL)
    LocalResource._start_supervisor = start_then_die
handle = asyncio.run(resource.launch(LaunchRequest.model_validate_json(request)))
print(json.dumps(handle), flush=True)
if mode == "linger":
    time.sleep(1000)
"""


async def run_launcher(env: Env, request: LaunchRequest,
                       mode: str) -> asyncio.subprocess.Process:
    """Another process (another worker) launching ``request`` with the same settings."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER, json.dumps(resource_settings(env.root)),
        request.model_dump_json(), mode, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )


async def test_concurrent_first_launches_start_one_process(env: Env):
    request = env.request(COUNTING_SCRIPT, 6)
    # Two other processes and four fresh resources in this one launch at the same time.
    launchers = [await run_launcher(env, request, "exit") for _ in range(2)]
    handles = await asyncio.gather(*(env.launch(request, make_resource(env.root))
                                     for _ in range(4)))
    for launcher in launchers:
        out, _ = await launcher.communicate()
        assert launcher.returncode == 0
        handles.append(json.loads(out))
    assert all(handle == handles[0] for handle in handles)
    assert (await env.resource.wait(handles[0], WAIT_LIMIT_S)).status == "complete"
    assert starts(env.workdir(6)) == ["started"]


async def test_a_launch_that_crashed_after_starting_the_supervisor_is_adopted(env: Env):
    request = env.request(COUNTING_SCRIPT.replace("0.5", "2"), 8)
    crashed = await run_launcher(env, request, "crash")
    out, _ = await crashed.communicate()
    assert crashed.returncode == -signal.SIGKILL and out == b""  # it never saw a handle

    # The retried launch, from a fresh resource as a new worker would, adopts the job.
    adopted = await env.launch(request, make_resource(env.root))
    assert (await env.resource.poll(adopted)).status == "running"
    assert owner_uid(adopted["id"]) == env.account.uid
    assert parent_pid(adopted["id"]) == adopted["supervisor_pid"]
    assert await env.resource.launch(request) == adopted
    assert (await env.resource.wait(adopted, WAIT_LIMIT_S)).status == "complete"
    assert starts(env.workdir(8)) == ["started"]


@pytest.mark.parametrize("launcher_end", ["exit", "sigkill"])
async def test_job_survives_the_launching_process(env: Env, launcher_end: str):
    mode = "linger" if launcher_end == "sigkill" else "exit"
    launcher = await run_launcher(env, env.request("sleep 1000\n"), mode)
    assert launcher.stdout is not None
    handle = json.loads(await launcher.stdout.readline())
    env.handles.append(handle)
    if launcher_end == "sigkill":
        launcher.kill()
    assert await launcher.wait() == (-signal.SIGKILL if launcher_end == "sigkill" else 0)

    assert (await env.resource.poll(handle)).status == "running"
    job, supervisor = handle["id"], handle["supervisor_pid"]
    assert parent_pid(job) == supervisor
    assert parent_pid(supervisor) not in (launcher.pid, os.getpid())
    assert os.getsid(job) == job != os.getsid(0)
    assert os.getsid(supervisor) not in (job, os.getsid(0))

    await env.resource.stop(handle, 5.0)
    assert (await env.resource.poll(handle)).status == "failed"


async def test_jobs_of_one_resource_have_their_own_state(env: Env):
    first = await env.launch(env.request("sleep 1000\n", 10))
    second = await env.launch(env.request("sleep 1000\n", 11))
    assert first["id"] != second["id"]
    await env.resource.stop(first, 1.0)
    assert (await env.resource.poll(first)).status == "failed"
    assert (await env.resource.poll(second)).status == "running"
    assert is_running(second["id"])


FORGING_SCRIPT = """\
forged='{{"id": {victim}, "pgid": {victim}, "job_pid": {victim}, "supervisor_pid": {victim},
  "started_at": 0, "code": 0, "ended_at": 1, "cpus": 1000}}'
for name in .uws-launch.json ended.json started.json spec.json; do echo "$forged" > "$name"; done
echo {victim} > .uws-pid
echo 0 > .uws-exit
printf '#!/bin/bash\\nexit 0\\n' > .uws-run.sh
# The service's own state is closed to the job.
(echo "$forged" > {state}/ended.json) 2> state.err
ls {state} 2>> state.err
touch ready
sleep 1000
"""


async def test_files_the_job_forges_in_its_workdir_change_nothing(env: Env):
    victim = subprocess.Popen(["sleep", "1000"])  # not the job's: must outlive its stop
    try:
        state_dir = env.root / "local-jobs" / "12"
        request = env.request(FORGING_SCRIPT.format(victim=victim.pid, state=state_dir), 12)
        handle = await env.launch(request)
        workdir = env.workdir(12)
        assert await eventually(lambda: (workdir / "ready").exists()), job_log(workdir)
        assert victim.pid not in (handle["id"], handle["pgid"], handle["supervisor_pid"])

        assert (await env.resource.poll(handle)).status == "running"  # not its "ended"
        assert await env.resource.launch(request) == handle  # not its "launch record"
        assert await make_resource(env.root).launch(request) == handle
        assert (workdir / "state.err").read_text().count("Permission denied") == 2

        await env.resource.stop(handle, 1.0)
        state = await env.resource.poll(handle)
        assert (state.status, state.exit_code) == ("failed", 143)  # the real, TERMed end
        assert state.core_hours < 1 / 60  # from the server's start, one CPU: not its 1000
        assert is_running(victim.pid)
    finally:
        victim.kill()
        victim.wait()


# --- the launcher -------------------------------------------------------------------------


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def ask_launcher(env: Env, request: bytes) -> str:
    """Send ``request`` to this process's launcher for ``env`` and return its answer."""
    launcher = launcher_for(env.root / "local-jobs")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(launcher.socket_path))
        conn.sendall(request)
        return conn.recv(256).decode()


async def test_one_launcher_forks_every_supervisor(env: Env):
    handles = [await env.launch(env.request("sleep 1000\n", n)) for n in (20, 21, 22)]
    launchers = {parent_pid(h["supervisor_pid"]) for h in handles}
    assert len(launchers) == 1  # forked by one process, not a new interpreter each
    launcher = launchers.pop()
    assert "--serve" in cmdline(launcher)
    assert parent_pid(launcher) == os.getpid()  # this process's own, ending with it
    socket_path = env.root / "local-jobs" / f"launcher-{os.getpid()}.sock"
    mode = socket_path.stat()
    assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o600
    assert stat.S_IMODE((env.root / "local-jobs").stat().st_mode) == 0o700
    for handle in handles:  # each supervisor leads a session of its own
        assert os.getsid(handle["supervisor_pid"]) == handle["supervisor_pid"]
        assert (await env.resource.poll(handle)).status == "running"


async def test_a_killed_launcher_is_replaced_and_its_jobs_go_on(env: Env):
    first = await env.launch(env.request("sleep 1000\n", 23))
    launcher = parent_pid(first["supervisor_pid"])
    os.kill(launcher, signal.SIGKILL)
    assert await eventually(lambda: not is_running(launcher))

    second = await env.launch(env.request(COUNTING_SCRIPT, 24))
    assert parent_pid(second["supervisor_pid"]) not in (launcher, os.getpid())
    assert (await env.resource.wait(second, WAIT_LIMIT_S)).status == "complete"
    assert (await env.resource.poll(first)).status == "running"  # untouched
    assert is_running(first["id"])


async def test_the_launcher_starts_only_new_jobs_of_its_directory(env: Env):
    handle = await env.launch(env.request("sleep 1000\n", 25))
    (env.root / "local-jobs" / "26").mkdir(mode=0o700)
    (env.root / "outside").mkdir(mode=0o700)
    for request, why in [(b"25\n", "that job was started already"),
                         (b"99\n", "no such job"), (b"../outside\n", "no such job"),
                         (b"/etc\n", "no such job"), (b"\n", "no such job"),
                         (b"x" * 500, "no such job")]:
        assert ask_launcher(env, request) == f"refused: {why}\n", request
    assert (await env.resource.poll(handle)).status == "running"
    assert not (env.root / "local-jobs" / "26" / "started.json").exists()


async def test_the_launcher_answers_only_the_service(env: Env):
    # Its directory keeps every other account out; were it opened, the launcher itself
    # still answers nobody but the service's own uid.
    await env.launch(env.request("sleep 1000\n", 27))
    state_root = env.root / "local-jobs"
    state_root.chmod(0o755)
    try:
        socket_path = state_root / f"launcher-{os.getpid()}.sock"
        socket_path.chmod(0o666)
        probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(10); "
                 f"s.connect({str(socket_path)!r}); s.sendall(b'28\\n'); "
                 "sys.stdout.write(s.recv(256).decode())")
        (state_root / "28").mkdir(mode=0o700)
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30,
            user=env.account.uid, group=env.account.gid, extra_groups=[])
        assert done.stdout == "refused: not the service's account\n", done
        assert not (state_root / "28" / "started.json").exists()
    finally:
        state_root.chmod(0o700)


async def test_the_launcher_ends_with_its_worker(env: Env):
    launcher = await run_launcher(env, env.request("sleep 1000\n", 29), "exit")
    out, _ = await launcher.communicate()
    handle = json.loads(out)
    env.handles.append(handle)
    socket_path = env.root / "local-jobs" / f"launcher-{launcher.pid}.sock"
    assert await eventually(lambda: not socket_path.exists(), 15)  # gone, and said so
    assert (await env.resource.poll(handle)).status == "running"  # its job lives on
    assert parent_pid(handle["supervisor_pid"]) != launcher.pid


# --- stopping and dying -------------------------------------------------------------------


TREE_SCRIPT = """\
setsid sleep 1000 & echo $! > setsid.pid
nohup sleep 1000 > /dev/null 2>&1 & echo $! > nohup.pid
bash -c 'sleep 1000 & echo $! > grandchild.pid; wait' &
setsid bash -c 'trap "" TERM; sleep 1000 & echo $! > orphan.pid' &
sleep 1000
"""
TREE_PIDS = ("setsid.pid", "nohup.pid", "grandchild.pid", "orphan.pid")


async def test_stop_ends_the_whole_tree_even_what_left_the_group(env: Env):
    handle = await env.launch(env.request(TREE_SCRIPT))
    pids = await pids_written(env.workdir(1), *TREE_PIDS)
    for name, pid in pids.items():
        assert await eventually(lambda pid=pid: is_running(pid)), name
        assert owner_uid(pid) == env.account.uid, name
    # These left the job's group and session; the orphan's parent ended, and it was
    # handed to the supervisor (a subreaper) rather than to init.
    for name in ("setsid.pid", "orphan.pid"):
        assert os.getpgid(pids[name]) != handle["pgid"] and os.getsid(pids[name]) != handle["id"]
    assert await eventually(lambda: parent_pid(pids["orphan.pid"]) == handle["supervisor_pid"])

    await env.resource.stop(handle, 5.0)
    # The supervisor ended only once every process of the tree had: gone when stop returns.
    assert [name for name, pid in pids.items() if is_running(pid)] == []
    assert not is_running(handle["id"]) and not is_running(handle["supervisor_pid"])
    state = await env.resource.poll(handle)
    # The job's shell ended by the TERM; whether that is "failed" or "cancelled" for the
    # user is the caller's decision.
    assert (state.status, state.exit_code) == ("failed", 143)

    await env.resource.stop(handle, 5.0)  # a second stop is quiet
    assert (await env.resource.poll(handle)).exit_code == 143


async def test_what_the_job_leaves_behind_ends_with_it(env: Env):
    script = ("setsid bash -c 'trap \"\" TERM; exec sleep 1000' & echo $! > left.pid\n"
              "nohup sleep 1000 > /dev/null 2>&1 & echo $! > nohup.pid\n"
              "sleep 0.5\nexit 0\n")
    handle = await env.launch(env.request(script))
    pids = await pids_written(env.workdir(1), "left.pid", "nohup.pid")
    state = await env.resource.wait(handle, WAIT_LIMIT_S)
    assert (state.status, state.exit_code) == ("complete", 0)  # the job's own exit
    assert [name for name, pid in pids.items() if is_running(pid)] == []


async def test_term_to_the_supervisor_alone_reaches_the_job(env: Env):
    script = "sleep 1000 &\necho $! > child.pid\nwait\n"
    handle = await env.launch(env.request(script))
    child = (await pids_written(env.workdir(1), "child.pid"))["child.pid"]
    os.kill(handle["supervisor_pid"], signal.SIGTERM)
    state = await env.resource.wait(handle, WAIT_LIMIT_S)
    assert (state.status, state.exit_code) == ("failed", 143)
    assert not is_running(handle["id"]) and not is_running(child)


async def test_stop_kills_a_job_that_ignores_term(env: Env):
    script = "trap '' TERM\nwhile :; do sleep 0.1; done\n"
    handle = await env.launch(env.request(script))
    began = time.monotonic()
    await env.resource.stop(handle, 1.0)
    assert time.monotonic() - began < GRACE_S + 4  # KILLed after the grace period
    assert not is_running(handle["id"])
    state = await env.resource.poll(handle)
    assert (state.status, state.exit_code) == ("failed", 137)


def processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid and is_running(int(entry.name)):
                    found.append(int(entry.name))
            except FileNotFoundError:
                continue
    return found


async def test_stop_kills_a_tree_that_keeps_forking_and_ignores_term(env: Env):
    # New processes keep appearing while the supervisor sweeps: each one must be found.
    script = "trap '' TERM\nwhile :; do sleep 1000 & done\n"
    handle = await env.launch(env.request(script))
    assert await eventually(lambda: len(processes_of(env.account.uid)) >= 50)
    began = time.monotonic()
    await env.resource.stop(handle, 1.0)
    # The supervisor itself finished (nobody had to KILL it), and nothing is left.
    assert time.monotonic() - began < GRACE_S + 4
    assert processes_of(env.account.uid) == []
    assert (await env.resource.poll(handle)).exit_code == 137


async def test_stop_of_an_ended_job_is_quiet(env: Env):
    handle = await env.launch(env.request("exit 0\n"))
    await env.resource.wait(handle, WAIT_LIMIT_S)
    await env.resource.stop(handle, 1.0)
    assert (await env.resource.poll(handle)).status == "complete"


async def test_killed_supervisor_reads_failed_not_running(env: Env):
    handle = await env.launch(env.request("sleep 1000\n"))
    os.kill(handle["supervisor_pid"], signal.SIGKILL)
    state = await env.resource.wait(handle, WAIT_LIMIT_S)
    assert state.status == "failed"
    assert state.exit_code is None
    assert state.detail == "the job's supervisor ended without recording its end"
    # Nothing of the job goes on without its supervisor.
    assert await eventually(lambda: not group_exists(handle["pgid"]))
    await env.resource.stop(handle, 1.0)  # quiet
    assert (await env.resource.poll(handle)).status == "failed"


async def test_a_reused_pid_is_never_ours(env: Env):
    # A handle whose pids now name another process (here: this test) with other ticks.
    state_dir = env.root / "local-jobs" / "77"
    state_dir.mkdir(mode=0o700)
    handle = {"id": os.getpid(), "pgid": os.getpgid(0), "job_ticks": -5,
              "supervisor_pid": os.getpid(), "supervisor_ticks": -5,
              "state_dir": str(state_dir), "workdir": str(env.workdir(77)), "job_id": 77,
              "cpus": 1, "hostname": "127.0.0.1", "started_at": time.time()}
    assert (await env.resource.poll(handle)).status == "failed"
    began = time.monotonic()
    assert (await env.resource.wait(handle, WAIT_LIMIT_S)).status == "failed"
    assert time.monotonic() - began < 5
    await env.resource.stop(handle, 0.1)  # must not signal us: we are still here to assert
    assert is_running(os.getpid())


# --- sessions -----------------------------------------------------------------------------


async def test_session_endpoint_is_decided_by_the_resource(env: Env):
    endpoint = env.resource.session_endpoint(21, env.account)
    directory = env.root / "sessions" / "21"
    assert endpoint.socket_path == str(directory / "session.sock")
    assert endpoint.token_file == str(directory / "token")
    assert endpoint.owner_uid == env.account.uid
    assert not directory.exists()  # no I/O
    with pytest.raises(BackendError):  # only a user's own account may hold a session
        env.resource.session_endpoint(21, ExternalAccount(username="root", uid=0, gid=0))

    prepared = await env.resource.prepare_session(21, env.account)
    assert prepared == endpoint
    info = directory.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
        env.account.uid, env.account.gid, 0o700)
    token_file = Path(endpoint.token_file)
    info = token_file.lstat()
    assert stat.S_ISREG(info.st_mode)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (env.account.uid, 0o600)
    token = token_file.read_text()
    assert len(token) == 48 and int(token, 16) >= 0
    # Prepared again (a workflow task retried after its worker died, maybe once the
    # session runs): the running session keeps its socket and its token.
    (directory / "session.sock").write_text("stands for the socket")
    assert await env.resource.prepare_session(21, env.account) == endpoint
    assert sorted(p.name for p in directory.iterdir()) == ["session.sock", "token"]
    assert token_file.read_text() == token
    # One left unfinished (no token yet, or not the account's) starts clean, with a new one.
    token_file.unlink()
    assert await env.resource.prepare_session(21, env.account) == endpoint
    assert sorted(p.name for p in directory.iterdir()) == ["token"]
    assert token_file.read_text() != token
    os.chown(directory, 0, 0)
    second = token_file.read_text()
    assert await env.resource.prepare_session(21, env.account) == endpoint
    assert directory.stat().st_uid == env.account.uid
    assert token_file.read_text() not in (token, second)


async def test_the_session_is_the_jobs_and_nobody_elses(env: Env, stranger: ExternalAccount):
    endpoint = await env.resource.prepare_session(22, env.account)
    token = Path(endpoint.token_file).read_text()
    serve = (f"import socket; s = socket.socket(socket.AF_UNIX); "
             f"s.bind({endpoint.socket_path!r}); s.listen()")
    script = (f"cat {endpoint.token_file} > token.txt\n"
              f"{sys.executable} -c {shlex.quote(serve)}\n"
              f"ls -l {endpoint.socket_path} > socket.txt\n"
              "exit 0\n")
    handle = await env.launch(env.request(script, 22))
    state = await env.resource.wait(handle, WAIT_LIMIT_S)
    workdir = env.workdir(22)
    assert state.status == "complete", job_log(workdir)
    assert (workdir / "token.txt").read_text() == token
    assert (workdir / "socket.txt").read_text().startswith("s")  # it could listen there
    # Once the job has ended, its session's directory is gone.
    assert not Path(endpoint.socket_path).parent.exists()

    # Another user's job can neither read a session's token nor look into the directory.
    other = await env.resource.prepare_session(23, env.account)
    stranger_ws = env.root / "stranger"
    stranger_ws.mkdir(mode=0o700)
    os.chown(stranger_ws, stranger.uid, stranger.gid)  # type: ignore[arg-type]
    sessions = env.root / "sessions"
    script = (f"cat {other.token_file} > stolen.txt 2> cat.err\n"
              f"ls {sessions / '23'} 2> ls-session.err\n"
              f"ls {sessions} 2> ls-sessions.err\n"
              "exit 0\n")
    request = LaunchRequest(job_id=24, script=script, workdir=str(stranger_ws / "job"),
                            account=stranger)
    state = await env.resource.wait(await env.launch(request), WAIT_LIMIT_S)
    out = stranger_ws / "job"
    assert state.status == "complete", job_log(out)
    assert (out / "stolen.txt").read_text() == ""
    for name in ("cat.err", "ls-session.err", "ls-sessions.err"):
        assert "Permission denied" in (out / name).read_text(), name
    assert Path(other.token_file).exists()  # the other session is untouched


async def test_stop_removes_the_session(env: Env):
    endpoint = await env.resource.prepare_session(25, env.account)
    handle = await env.launch(env.request("sleep 1000\n", 25))
    assert Path(endpoint.token_file).exists()
    await env.resource.stop(handle, 1.0)
    assert not Path(endpoint.token_file).parent.exists()
