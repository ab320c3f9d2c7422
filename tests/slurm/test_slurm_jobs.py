"""Jobs on a real Slurm cluster, driven through the whole HTTP API: the app and worker of
conftest.py, slurmrestd on loopback, jobs running as real non-root OS accounts."""

from __future__ import annotations

import asyncio
import pwd
from pathlib import Path

import pytest

from app import slurm_dev
from db.tables import Workspace
from tests.conftest import eventually
from tests.slurm.conftest import job_of, record_history, slurm_jobs_named, start_job, wait_job


async def workspace_dir(workspace_id: int) -> Path:
    row = await Workspace.select(Workspace.file_path).where(Workspace.id == workspace_id).first()
    return Path(row["file_path"])


async def test_local_test_job_runs_as_the_user(slurm_client, slurm_user, slurm_rest) -> None:
    job = await start_job(slurm_client, slurm_user, "local_test_job",
                          {"duration_seconds": 3}, num_cpus=2)
    assert job["status"] == "pending"
    running = await wait_job(slurm_client, slurm_user, job["id"], "running", "complete",
                             "failed")
    assert running["status"] == "running", running
    # The Slurm job carries our id in its name and belongs to the user, not to root.
    [sjob] = await slurm_jobs_named(slurm_rest, f"uws-{job['id']}")
    assert sjob["user_name"] == slurm_user.name
    assert sjob["cpus"] == 2
    assert running["resource_job_id"] == sjob["job_id"]

    done = await wait_job(slurm_client, slurm_user, job["id"], "complete", "failed")
    assert done["status"] == "complete", done
    assert done["core_hours"] > 0
    assert done["datetime_start"] and done["datetime_end"]
    output = (await workspace_dir(job["workspace_id"])) / ".jobs" / str(job["id"]) \
        / "test_job_output.txt"
    assert output.stat().st_uid == pwd.getpwnam(slurm_user.name).pw_uid
    assert output.read_text().count("started") == 1


async def test_batch_script_as_user_with_time_left(slurm_client, slurm_user, temporal_env,
                                                    slurm_root, slurm_rest) -> None:
    # No #! line: the job type adds one. The job runs until the test releases it.
    script = ('cd "$UWS_WORKSPACE_DIR"\n'
              'echo "$(id -un) $USER $HOME $SLURM_JOB_ID" > who.txt\n'
              'for _ in $(seq 600); do [ -e release ] && break; sleep 0.2; done\nsleep 1\n')
    job = await start_job(slurm_client, slurm_user, "batch_script", {"script": script},
                          time_limit_min=7)

    async def time_left() -> dict | None:
        current = (await job_of(slurm_client, slurm_user, job["id"]))["job_details"]
        details = current.get("current_job_details", {})
        return details if "time_left_seconds" in details else None

    details = await eventually(time_left, timeout=60)
    assert details["time_limit_min"] == 7
    assert 0 < details["time_left_seconds"] <= 7 * 60
    # An extension reaches Slurm: its own limit is raised (by the service user), so Slurm
    # does not end the job at the limit it was submitted with.
    r = await slurm_client.put(f"/jobs/{job['id']}/extend/", headers=slurm_user.headers,
                               json={"minutes": 5})
    assert r.status_code == 200, r.text

    async def slurm_limit() -> int | None:
        [sjob] = await slurm_jobs_named(slurm_rest, f"uws-{job['id']}")
        return sjob["time_limit"] if sjob["time_limit"] >= 12 else None

    assert await eventually(slurm_limit, timeout=60) == 12
    (await workspace_dir(job["workspace_id"]) / "release").touch()

    done = await wait_job(slurm_client, slurm_user, job["id"], "complete", "failed")
    assert done["status"] == "complete", done
    assert done["core_hours"] > 0
    who = (await workspace_dir(job["workspace_id"])) / "who.txt"
    account = pwd.getpwnam(slurm_user.name)
    assert who.stat().st_uid == account.pw_uid
    name, user, home, slurm_id = who.read_text().split()
    assert (name, user, home) == (slurm_user.name, slurm_user.name, account.pw_dir)
    assert int(slurm_id) == done["resource_job_id"]
    await record_history(temporal_env, job["id"], "slurm_job_complete", slurm_root)


async def test_batch_script_validated(slurm_client, slurm_user) -> None:
    r = await slurm_client.post("/workspaces/", headers=slurm_user.headers,
                                json={"name": "v", "description": "v"})
    ws = r.json()["data"]["workspace"]
    r = await slurm_client.put(f"/workspaces/{ws['id']}/start/", headers=slurm_user.headers,
                               json={"job_type": "batch_script", "job_details": {"script": 3}})
    assert r.status_code == 400
    assert r.json()["message"] == "job_details.script must be a non-empty string."


async def test_failing_script(slurm_client, slurm_user, temporal_env, slurm_root) -> None:
    job = await start_job(slurm_client, slurm_user, "batch_script",
                          {"script": "#!/bin/sh\necho about to fail\nexit 3\n"})
    done = await wait_job(slurm_client, slurm_user, job["id"], "complete", "failed")
    assert done["status"] == "failed", done
    message = done["job_details"]["current_job_details"]["message"]
    assert "FAILED" in message and "exit code 3" in message, message
    await record_history(temporal_env, job["id"], "slurm_job_failed", slurm_root)


async def test_stop(slurm_client, slurm_user, slurm_rest, temporal_env, slurm_root) -> None:
    job = await start_job(slurm_client, slurm_user, "batch_script", {"script": "sleep 300\n"})
    await wait_job(slurm_client, slurm_user, job["id"], "running")
    r = await slurm_client.put(f"/jobs/{job['id']}/stop/", headers=slurm_user.headers)
    assert r.status_code == 200, r.text
    done = await wait_job(slurm_client, slurm_user, job["id"], "complete", "failed")
    assert done["status"] == "complete", done
    [sjob] = await slurm_jobs_named(slurm_rest, f"uws-{job['id']}")
    assert sjob["job_state"] in ("CANCELLED", "FAILED"), sjob["job_state"]
    await record_history(temporal_env, job["id"], "slurm_job_stopped", slurm_root)


async def test_slurmrestd_down_while_running(slurm_client, slurm_user, slurm_cluster,
                                             slurm_rest, temporal_env, slurm_root) -> None:
    job = await start_job(slurm_client, slurm_user, "batch_script", {"script": "sleep 6\n"})
    await wait_job(slurm_client, slurm_user, job["id"], "running")
    slurm_dev.stop_daemon(slurm_cluster, "slurmrestd")
    try:
        # Unreachable is not ended: the job stays running in our records, and the outage
        # shows as its last event.
        async def outage_seen() -> dict | None:
            j = await job_of(slurm_client, slurm_user, job["id"])
            event = j["job_details"]["current_job_details"].get("last_event", "")
            return j if event.startswith("resource unreachable") else None

        seen = await eventually(outage_seen, timeout=30)
        assert seen["status"] == "running"
        await asyncio.sleep(8)  # the job itself ends while slurmrestd is down
        assert (await job_of(slurm_client, slurm_user, job["id"]))["status"] == "running"
    finally:
        await asyncio.to_thread(slurm_dev.start_daemon, slurm_cluster, "slurmrestd")
    done = await wait_job(slurm_client, slurm_user, job["id"], "complete", "failed",
                          timeout=90)
    assert done["status"] == "complete", done
    # Core-hours come from Slurm's own start and end, not from when we learnt of the end.
    [sjob] = await slurm_jobs_named(slurm_rest, f"uws-{job['id']}")
    assert sjob["job_state"] == "COMPLETED"
    ran = sjob["cpus"] * (sjob["end_time"] - sjob["start_time"])
    assert ran > 0 and done["core_hours"] * 3600 == pytest.approx(ran)
    await record_history(temporal_env, job["id"], "slurm_job_unreachable", slurm_root)


@pytest.mark.slow
async def test_time_limit(slurm_client, slurm_user, slurm_rest, temporal_env,
                          slurm_root) -> None:
    job = await start_job(slurm_client, slurm_user, "batch_script", {"script": "sleep 600\n"},
                          time_limit_min=1)
    await wait_job(slurm_client, slurm_user, job["id"], "running")
    done = await wait_job(slurm_client, slurm_user, job["id"], "complete", "failed",
                          timeout=150)
    message = done["job_details"]["current_job_details"]["message"]
    # Whichever notices first, the workflow's deadline or Slurm's own limit, ends it.
    assert message == "Time limit reached." or "TIMEOUT" in message, done
    [sjob] = await slurm_jobs_named(slurm_rest, f"uws-{job['id']}")
    assert sjob["job_state"] in ("CANCELLED", "TIMEOUT", "FAILED"), sjob["job_state"]
    assert sjob["time_limit"] == 1
    await record_history(temporal_env, job["id"], "slurm_job_time_limit", slurm_root)
