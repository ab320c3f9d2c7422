"""JupyterLab sessions on the real single-node Slurm cluster, through the whole stack: the
API starts them, Slurm runs them as the owner's OS account, the passthrough opens them in
headless Chromium. Their life on Slurm: queued with Slurm's reason, time left, extension,
stop, idle culling, a node failure, and a worker killed while a session runs."""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app import slurm_dev
from app.stack import UwsStack
from tests.conftest import eventually
from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS, print_6_times_7
from tests.slurm.conftest import (
    IDLE_JOB_TYPE,
    SlurmUser,
    job_of,
    make_slurm_user,
    record_history,
    slurm_jobs_named,
    start_job,
    wait_job,
)
from tests.slurm.test_slurm_jobs import workspace_dir

pytestmark = pytest.mark.slow
READY = "Webserver ready."


async def ready_session(client: httpx.AsyncClient, user: SlurmUser, job_id: int) -> dict:
    """The job once its session answered the server's readiness probe."""
    async def ready() -> dict | None:
        job = await job_of(client, user, job_id)
        assert job["status"] in ("pending", "running"), job
        details = job["job_details"]["current_job_details"]
        return job if details.get("message") == READY else None

    return await eventually(ready, timeout=180, interval=0.3)


async def slurm_job(rest: httpx.AsyncClient, job_id: int) -> dict:
    [found] = await slurm_jobs_named(rest, f"uws-{job_id}")
    return found


def scontrol(cluster: slurm_dev.DevCluster, *args: str) -> str:
    done = subprocess.run(["scontrol", *args], env=cluster.env(), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def processes_of(uid: int) -> list[int]:
    """Live processes of ``uid`` (zombies excluded: they have ended)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            info = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        if int(fields["Uid"].split()[1]) == uid and not fields["State"].strip().startswith("Z"):
            found.append(int(entry))
    return found


async def gone(uid: int) -> bool:
    return not processes_of(uid)


def passthrough_base(job: dict) -> str:
    proxy = job["job_details"]["current_job_details"]["proxy_details"]
    return proxy["path"]


def session_token(job: dict) -> str:
    url = job["job_details"]["current_job_details"]["connection_details"]["url_path"]
    return url.split("token=")[1].split("&")[0]


async def stop_and_wait(client: httpx.AsyncClient, user: SlurmUser, job_id: int) -> dict:
    r = await client.put(f"/jobs/{job_id}/stop/", headers=user.headers)
    assert r.status_code == 200, r.text
    return await wait_job(client, user, job_id, "complete", "failed", timeout=120)


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: `apt-get install chromium`")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                            args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


async def test_session_on_slurm_in_the_browser(slurm_client, slurm_user, slurm_api_key,
                                               slurm_rest, slurm_cluster, browser,
                                               temporal_env, slurm_root) -> None:
    job = await start_job(slurm_client, slurm_user, "jupyter_lab")
    job = await ready_session(slurm_client, slurm_user, job["id"])
    details = job["job_details"]["current_job_details"]
    owner = pwd.getpwnam(slurm_user.name)

    # Slurm runs it as the owner: its own record and scontrol agree.
    sjob = await slurm_job(slurm_rest, job["id"])
    assert sjob["job_state"] == "RUNNING"
    assert (sjob["user_name"], sjob["user_id"]) == (slurm_user.name, owner.pw_uid)
    assert job["resource_job_id"] == sjob["job_id"]
    shown = scontrol(slurm_cluster, "show", "job", str(sjob["job_id"]))
    assert f"UserId={slurm_user.name}({owner.pw_uid})" in shown
    assert f"JobName=uws-{job['id']}" in shown

    # The passthrough's upstream is the server's choice: a Unix socket in the server's
    # sessions directory, bound by JupyterLab running as the owner (never root).
    proxy = details["proxy_details"]
    assert set(proxy) == {"hostname", "path", "socket", "uid"}
    assert proxy["uid"] == owner.pw_uid != 0
    info = os.lstat(proxy["socket"])
    assert stat.S_ISSOCK(info.st_mode) and info.st_uid == owner.pw_uid
    assert stat.S_IMODE(os.stat(os.path.dirname(proxy["socket"])).st_mode) == 0o700

    # Running shows Slurm's own time left.
    async def time_left() -> dict | None:
        current = (await job_of(slurm_client, slurm_user, job["id"]))["job_details"]
        shown = current["current_job_details"]
        return shown if "time_left_seconds" in shown else None

    left = await eventually(time_left, timeout=60)
    assert left["slurm_job_id"] == sjob["job_id"]
    assert 0 < left["time_left_seconds"] <= left["time_limit_min"] * 60

    # The owner's browser opens connection_details and runs a cell.
    connection = details["connection_details"]
    assert connection["url_domain"] == str(slurm_client.base_url).rstrip("/")
    link = connection["url_domain"] + connection["url_path"]
    context = await browser.new_context()
    page = await context.new_page()
    assert await print_6_times_7(page, link) == "42"

    # Another user is refused: the link's ticket is spent, and the session is not theirs.
    other = await make_slurm_user(slurm_client, slurm_api_key)
    stranger = await browser.new_context()
    other_page = await stranger.new_page()
    response = await other_page.goto(link)
    assert response is not None and response.status == 403
    await stranger.set_extra_http_headers(other.headers)
    response = await other_page.goto(link.split("?")[0])
    assert response is not None and response.status == 404
    await stranger.close()
    # Nor can their own processes on the node reach the socket around the passthrough.
    probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n")
    done = subprocess.run(["runuser", "-u", other.name, "--", "/usr/bin/python3", "-c", probe,
                           proxy["socket"]], capture_output=True, timeout=30)
    assert done.returncode == 13, done

    # An extension raises Slurm's own limit.
    r = await slurm_client.put(f"/jobs/{job['id']}/extend/", headers=slurm_user.headers,
                               json={"minutes": 5})
    assert r.status_code == 200, r.text
    limit = sjob["time_limit"]

    async def raised() -> int | None:
        now = (await slurm_job(slurm_rest, job["id"]))["time_limit"]
        return now if now > limit else None

    assert await eventually(raised, timeout=60) == limit + 5

    # Stop cancels the Slurm job; JupyterLab and everything of the owner's exit with it.
    done = await stop_and_wait(slurm_client, slurm_user, job["id"])
    assert done["status"] == "complete", done
    ended = await slurm_job(slurm_rest, job["id"])
    assert ended["job_state"] in ("CANCELLED", "COMPLETED"), ended["job_state"]
    await eventually(lambda: gone(owner.pw_uid), timeout=60)
    assert not os.path.exists(proxy["socket"])
    log = (await workspace_dir(job["workspace_id"])) / ".jobs" / str(job["id"]) / "job.log"
    # JupyterLab itself was told (SIGTERM to the batch step) and shut its kernel down.
    said = log.read_text()
    assert "received signal 15, stopping" in said and "Kernel shutdown" in said, said[-2000:]
    response = await page.goto(link.split("&uws_ticket=")[0])
    assert response is not None and response.status == 403
    assert "has ended" in await page.content()
    await context.close()
    await record_history(temporal_env, job["id"], "slurm_session_stopped",
                         slurm_root)


async def test_idle_session_is_stopped_on_slurm(slurm_client, slurm_user, slurm_rest,
                                                temporal_env, slurm_root) -> None:
    job = await start_job(slurm_client, slurm_user, IDLE_JOB_TYPE)
    await ready_session(slurm_client, slurm_user, job["id"])
    # Nobody opens it: idle culling stops it, and Slurm's job ends.
    done = await wait_job(slurm_client, slurm_user, job["id"], "complete", "failed",
                          timeout=180)
    assert done["status"] == "complete", done
    assert "without activity" in done["job_details"]["current_job_details"]["message"]
    sjob = await slurm_job(slurm_rest, job["id"])
    assert sjob["job_state"] in ("CANCELLED", "COMPLETED"), sjob["job_state"]
    await eventually(lambda: gone(pwd.getpwnam(slurm_user.name).pw_uid), timeout=60)
    await record_history(temporal_env, job["id"], "slurm_session_idle_stopped",
                         slurm_root)


async def test_queued_session_shows_slurm_reason(slurm_client, slurm_user, slurm_rest,
                                                 slurm_cluster, temporal_env,
                                                 slurm_root) -> None:
    # Root's job takes every CPU of the node: the session waits in Slurm's queue.
    r = await slurm_rest.post("/job/submit", json={
        "script": "#!/bin/sh\nsleep 600\n",
        "job": {"name": "uws-test-blocker", "current_working_directory": "/tmp",
                "environment": {"PATH": "/usr/bin:/bin"}, "cpus_per_task": 4,
                "standard_output": "/dev/null"}})
    assert r.status_code == 200, r.text
    blocker = r.json()["job_id"]
    try:
        job = await start_job(slurm_client, slurm_user, "jupyter_lab")

        async def reason(*wanted: str) -> str | None:
            seen = await job_of(slurm_client, slurm_user, job["id"])
            assert seen["status"] == "pending", seen
            shown = seen["job_details"]["current_job_details"].get("pending_reason")
            return shown if shown in wanted else None

        first = await eventually(lambda: reason("Resources", "Priority"), timeout=60)
        # Held by an operator: the reason changes, and shows.
        sjob = await slurm_job(slurm_rest, job["id"])
        scontrol(slurm_cluster, "hold", str(sjob["job_id"]))
        await eventually(lambda: reason("JobHeldAdmin"), timeout=60)
        r = await slurm_client.get(f"/jobs/{job['id']}/events/", headers=slurm_user.headers)
        details = [e.get("detail") for e in r.json()["data"]["events"] if e["type"] == "status"]
        assert f"queued: {first}" in details and "queued: JobHeldAdmin" in details, details
        scontrol(slurm_cluster, "release", str(sjob["job_id"]))
    finally:
        await slurm_rest.delete(f"/job/{blocker}")
    # Room on the node: it starts, and the queue's reason is gone.
    ready = await ready_session(slurm_client, slurm_user, job["id"])
    assert ready["job_details"]["current_job_details"].get("pending_reason") is None
    done = await stop_and_wait(slurm_client, slurm_user, job["id"])
    assert done["status"] == "complete", done
    await record_history(temporal_env, job["id"], "slurm_session_queued",
                         slurm_root)


async def test_worker_killed_while_session_runs(slurm_client, slurm_user, slurm_rest,
                                                slurm_stack: UwsStack, temporal_env,
                                                slurm_root) -> None:
    job = await start_job(slurm_client, slurm_user, "jupyter_lab")
    job = await ready_session(slurm_client, slurm_user, job["id"])
    base, token = passthrough_base(job), session_token(job)
    slurm_stack.workers[0].kill()
    try:
        # Nothing of the session depended on the worker: still running, still reachable.
        await asyncio.sleep(3)
        r = await slurm_client.get(f"{base}api/status", params={"token": token},
                                   headers=slurm_user.headers)
        assert r.status_code == 200, r.text
        assert (await slurm_job(slurm_rest, job["id"]))["job_state"] == "RUNNING"
        assert (await job_of(slurm_client, slurm_user, job["id"]))["status"] == "running"
    finally:
        slurm_stack.start_worker()
    # The new worker carries the session on: a stop reaches Slurm.
    done = await stop_and_wait(slurm_client, slurm_user, job["id"])
    assert done["status"] == "complete", done
    ended = await slurm_job(slurm_rest, job["id"])
    assert ended["job_state"] in ("CANCELLED", "COMPLETED"), ended["job_state"]
    await record_history(temporal_env, job["id"], "slurm_session_worker_killed",
                         slurm_root)


async def test_node_failure_fails_the_session(slurm_client, slurm_user, slurm_rest,
                                              slurm_cluster, temporal_env,
                                              slurm_root) -> None:
    job = await start_job(slurm_client, slurm_user, "jupyter_lab")
    job = await ready_session(slurm_client, slurm_user, job["id"])
    node = socket.gethostname().split(".")[0]
    scontrol(slurm_cluster, "update", f"NodeName={node}", "State=DOWN", "Reason=uws-test")
    try:
        done = await wait_job(slurm_client, slurm_user, job["id"], "complete", "failed",
                              timeout=120)
    finally:
        await node_in_service(slurm_cluster, node)
    assert done["status"] == "failed", done
    message = done["job_details"]["current_job_details"]["message"]
    # The cluster requeues jobs of a failed node (JobRequeue=1, Slurm's default): the
    # session ends failed saying so, and is cancelled rather than run a second time.
    assert "requeued" in message and "node failed" in message, message
    sjob = await slurm_job(slurm_rest, job["id"])
    assert sjob["restart_cnt"] == 1
    assert sjob["job_state"] == "CANCELLED", sjob["job_state"]
    await eventually(lambda: gone(pwd.getpwnam(slurm_user.name).pw_uid), timeout=60)
    await record_history(temporal_env, job["id"], "slurm_session_requeued",
                         slurm_root)


async def node_in_service(cluster: slurm_dev.DevCluster, node: str) -> None:
    """Back to idle: slurmd re-registers on its own (ReturnToService=2); resumed if not."""
    async def idle() -> bool:
        shown = scontrol(cluster, "show", "node", node)
        if "State=DOWN" in shown or "DRAIN" in shown:
            subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"],
                           env=cluster.env(), capture_output=True, timeout=30)
            return False
        return "State=IDLE" in shown or "State=MIXED" in shown

    await eventually(idle, timeout=60, interval=0.5)
