"""LocalResource stopping jobs (the whole process tree, even what left the group), jobs
or supervisors that die, and the sessions the resource prepares for its jobs.
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from controllers.base import ExternalAccount, LaunchRequest
from controllers.errors import BackendError
from tests.local_resource.helpers import (
    GRACE_S,
    WAIT_LIMIT_S,
    Env,
    eventually,
    group_exists,
    is_running,
    job_log,
    owner_uid,
    parent_pid,
    pids_written,
)

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
