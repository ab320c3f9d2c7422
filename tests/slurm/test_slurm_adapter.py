"""The v0.0.38 adapter and SlurmResource's state mapping: first on job records, then on
what the real slurmrestd answers (errors in 500s and in 200s, unknown jobs, bad tokens)."""

from __future__ import annotations

import pwd

import httpx
import pytest
from pydantic import ValidationError

from controllers.base import ExternalAccount, LaunchRequest
from controllers.errors import InvalidRequest
from controllers.resources.slurm import SlurmResource, SlurmSettings
from controllers.resources.slurm.adapter import INVALID_JOB_ID, SlurmApiError, SlurmJob
from controllers.resources.slurm.resource import decode_exit, job_state, raised_limit
from controllers.resources.slurm.tokens import TokenSource
from controllers.resources.slurm.v0_0_38 import AdapterV0038

NOW = 1_000_000.0


def _job(state: str, **kw: object) -> SlurmJob:
    base: dict = {"job_id": 7, "name": "uws-1", "user_name": "u", "state": state,
                  "cpus": 2, "start_time": int(NOW) - 1800, "end_time": int(NOW) - 900,
                  "time_limit_min": 60, "batch_host": "node1"}
    return SlurmJob(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("state", "status"), [
    ("PENDING", "pending"), ("RUNNING", "running"), ("COMPLETING", "running"),
    ("COMPLETED", "complete"), ("FAILED", "failed"), ("CANCELLED", "failed"),
    ("TIMEOUT", "failed"), ("NODE_FAIL", "failed"), ("OUT_OF_MEMORY", "failed"),
    ("PREEMPTED", "failed"), ("SOMETHING_NEW", "unknown"),
])
def test_state_mapping(state: str, status: str) -> None:
    assert job_state(_job(state, exit_code=0), NOW).status == status


def test_failed_detail_exit_code_and_core_hours() -> None:
    st = job_state(_job("TIMEOUT", state_reason="TimeLimit", exit_code=15), NOW)
    assert st.detail == "Slurm job 7 TIMEOUT, reason TimeLimit, killed by signal 15"
    assert st.exit_code == 128 + 15
    assert st.core_hours == pytest.approx(2 * 900 / 3600)  # end - start, not now
    st = job_state(_job("FAILED", state_reason="NonZeroExitCode", exit_code=3 << 8), NOW)
    assert st.exit_code == 3 and "exit code 3" in st.detail
    assert decode_exit(None) == (None, "")


def test_running_uses_now_and_tells_time_left() -> None:
    # While running, Slurm's end_time is only the projected end.
    st = job_state(_job("RUNNING", end_time=int(NOW) + 1800), NOW)
    assert st.core_hours == pytest.approx(2 * 1800 / 3600)
    assert st.hostname == "node1"
    assert st.details["time_left_seconds"] == 1800
    assert st.details["projected_end_epoch"] == int(NOW) + 1800
    assert job_state(_job("PENDING", start_time=0, end_time=0), NOW).core_hours == 0


def test_requeued_job_is_failed_whatever_its_state() -> None:
    # Slurm requeued it (its node failed, or it was preempted): pending again, or even
    # running a second time, it is not the run we watched.
    for state in ("PENDING", "RUNNING", "COMPLETED"):
        st = job_state(_job(state, restart_count=1, state_reason="BeginTime"), NOW)
        assert st.status == "failed", state
        assert st.detail == "Slurm job 7 was requeued by Slurm (its node failed or it was " \
            "preempted)"
    record = AdapterV0038().parse_jobs({"jobs": [{"job_id": 7, "job_state": "PENDING",
                                                  "restart_cnt": 2}]})
    assert record[0].restart_count == 2


def test_pending_reason_is_the_detail() -> None:
    assert job_state(_job("PENDING", state_reason="Resources"), NOW).detail == "Resources"
    assert job_state(_job("PENDING", state_reason="None"), NOW).detail == ""


def test_limit_grows_only_for_an_extension() -> None:
    submitted = 1_000_000.6  # our deadline counts from here; Slurm starts a moment later
    deadline = submitted + 7 * 60
    # Slurm's whole-second start may read before ours: still no reason to grow.
    for start in (1_000_000, 1_000_001, 1_000_030):
        assert raised_limit(7, start, deadline) is None
    # Extended by 5 minutes: Slurm must plan to end no earlier than we do.
    for start in (1_000_000, 1_000_001):
        minutes = raised_limit(7, start, deadline + 5 * 60)
        assert minutes == 12
        assert start + minutes * 60 >= deadline + 5 * 60 - 2


def test_submit_body_v0_0_38() -> None:
    from controllers.resources.slurm.adapter import SubmitSpec

    body = AdapterV0038().submit_body(SubmitSpec(
        name="uws-3", script="#!/bin/sh\n", workdir="/w", environment={"PATH": "/bin"},
        cpus=2, memory_mb=512, time_limit_min=5, partition="gpu", gres="gpu:1"))
    job = body["job"]
    assert job["environment"] == {"PATH": "/bin"}  # an object in v0.0.38, not a list
    assert (job["cpus_per_task"], job["memory_per_node"], job["time_limit"]) == (2, 512, 5)
    assert (job["partition"], job["gres"]) == ("gpu", "gpu:1")
    assert "standard_output" not in job


def test_settings_validated() -> None:
    with pytest.raises(ValidationError, match="exactly one of jwt_key_file and token_env"):
        SlurmSettings(url="http://x", jwt_key_file="/k", token_env="T")
    with pytest.raises(ValidationError, match="needs jwt_key_file"):
        SlurmSettings(url="http://x", token_env="T", auth="per_user")
    with pytest.raises(ValidationError, match="Extra inputs"):
        SlurmSettings.model_validate({"url": "http://x", "token_env": "T", "partiton": "p"})


def test_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    source = TokenSource(key_file=None, env_var="UWS_TEST_SLURM_JWT", lifespan_s=60)
    monkeypatch.setenv("UWS_TEST_SLURM_JWT", "abc")
    assert source.token_for("anyone") == "abc"
    monkeypatch.delenv("UWS_TEST_SLURM_JWT")
    with pytest.raises(RuntimeError):
        source.token_for("anyone")


# --- against the real slurmrestd ----------------------------------------------------


@pytest.fixture
def resource(slurm_controllers) -> SlurmResource:
    found = slurm_controllers.main_resource
    assert isinstance(found, SlurmResource)
    return found


async def test_errors_of_real_answers(slurm_rest: httpx.AsyncClient, resource) -> None:
    adapter = AdapterV0038()
    r = await slurm_rest.get("/job/999999")
    assert r.status_code == 500
    errors = adapter.errors(r.json())
    assert SlurmApiError(r.status_code, errors).numbers == {INVALID_JOB_ID}
    # A job Slurm does not know (never, or purged after MinJobAge) is unknown, not ended.
    st = await resource.poll({"id": 999999, "user": "root"})
    assert st.status == "unknown" and "no longer knows job 999999" in st.detail


async def test_bad_token_and_unreachable_are_unknown(resource, slurm_cluster) -> None:
    wrong_key = SlurmResource(
        "s", SlurmSettings(url=slurm_cluster.rest_url, token_env="UWS_TEST_NO_SUCH_VAR"),
        storage=resource.storage, auth=resource.auth, passthrough_domain="",
        parameter_mapping={})
    assert (await wrong_key.poll({"id": 1, "user": "root"})).status == "unknown"
    assert not (await wrong_key.health()).ok
    nowhere = SlurmResource(
        "s", SlurmSettings(url="http://127.0.0.1:9", jwt_key_file=str(slurm_cluster.jwt_key)),
        storage=resource.storage, auth=resource.auth, passthrough_domain="",
        parameter_mapping={})
    st = await nowhere.poll({"id": 1, "user": "root"})
    assert st.status == "unknown" and "unreachable" in st.detail
    assert (await resource.health()).ok


async def test_errors_beside_a_job_id(resource, slurm_user, slurm_rest) -> None:
    """More CPUs than the node has: slurmrestd answers 200 with an error *and* a job id.
    The job exists, so the launch keeps it; it stays pending with Slurm's reason."""
    account = pwd.getpwnam(slurm_user.name)
    request = LaunchRequest(
        job_id=900_000_000 + account.pw_uid, script="sleep 1", workdir=account.pw_dir,
        account=ExternalAccount(username=account.pw_name, uid=account.pw_uid,
                                gid=account.pw_gid, home=account.pw_dir),
        resource_options={"num_cpus": 64}, time_limit_min=1)
    handle = await resource.launch(request)
    try:
        again = await resource.launch(request)  # found again, not resubmitted
        assert again["id"] == handle["id"] and again["job_id"] == handle["job_id"]
        st = await resource.poll(handle)
        assert st.status == "pending", st
        r = await slurm_rest.get(f"/job/{handle['id']}")
        [raw] = AdapterV0038().parse_jobs(r.json())
        assert raw.state == "PENDING" and st.detail == raw.state_reason != ""
    finally:
        await resource.stop(handle, 1.0)
    assert (await resource.poll(handle)).status == "failed"


async def test_per_user_tokens(resource, slurm_user, slurm_cluster, slurm_rest) -> None:
    """``auth = "per_user"``: each request carries a token minted for the job's owner."""
    per_user = SlurmResource(
        "s", SlurmSettings(url=slurm_cluster.rest_url, auth="per_user",
                           jwt_key_file=str(slurm_cluster.jwt_key), poll_interval_seconds=0.2),
        storage=resource.storage, auth=resource.auth, passthrough_domain="",
        parameter_mapping={})
    account = pwd.getpwnam(slurm_user.name)
    handle = await per_user.launch(LaunchRequest(
        job_id=800_000_000 + account.pw_uid, script="#!/bin/sh\ntrue\n",
        workdir=account.pw_dir, account=ExternalAccount(username=account.pw_name,
                                                        home=account.pw_dir)))
    state = await per_user.wait(handle, 30)
    while state.status not in ("complete", "failed"):
        state = await per_user.wait(handle, 30)
    assert state.status == "complete", state
    r = await slurm_rest.get(f"/job/{handle['id']}")
    assert r.json()["jobs"][0]["user_name"] == slurm_user.name


async def test_a_submit_slurm_refuses_for_good_is_permanent(resource, slurm_user) -> None:
    """A partition that does not exist: the real Slurm refuses the submission, and the
    launch says so as a permanent refusal (the job then fails with it, never retried)."""
    nowhere = SlurmResource(
        "s", resource.settings.model_copy(update={"partition": "no-such-partition"}),
        storage=resource.storage, auth=resource.auth, passthrough_domain="",
        parameter_mapping={})
    account = pwd.getpwnam(slurm_user.name)
    request = LaunchRequest(
        job_id=700_000_000 + account.pw_uid, script="sleep 1", workdir=account.pw_dir,
        account=ExternalAccount(username=account.pw_name, uid=account.pw_uid,
                                gid=account.pw_gid, home=account.pw_dir))
    with pytest.raises(InvalidRequest) as refused:
        await nowhere.launch(request)
    assert refused.value.user_message.startswith("Slurm refused the job: ")
    assert "partition" in refused.value.user_message.lower()
