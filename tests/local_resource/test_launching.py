"""LocalResource launching each job once (retried, concurrent, from other workers, after a
crash), and the launcher fork server that starts every supervisor.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from controllers.base import LaunchRequest
from controllers.resources.local.launcher import launcher_for
from tests.local_resource.helpers import (
    ROOT,
    WAIT_LIMIT_S,
    Env,
    eventually,
    is_running,
    job_log,
    make_resource,
    owner_uid,
    parent_pid,
    resource_settings,
)

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
