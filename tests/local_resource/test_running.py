"""LocalResource running jobs to their end, through its public API (launch, poll, wait), and
the account each job runs as, in a network namespace of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time

import pytest

from controllers.base import ExternalAccount, JobContext, LaunchRequest
from controllers.errors import BackendError, InvalidRequest
from controllers.job_types.local_test import LocalTestJob
from controllers.resources.local import LocalResource
from tests.local_resource.helpers import (
    WAIT_LIMIT_S,
    Env,
    job_log,
    make_resource,
    multi_user_auth,
    resource_settings,
)

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
