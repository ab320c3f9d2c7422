"""Run jobs on a Slurm cluster through slurmrestd's REST API.

Jobs are submitted as the workspace owner (``X-SLURM-USER-NAME``), so they run under the
owner's uid in the job's directory inside the workspace. The Slurm job name carries the
UWS job id (``<job_name_prefix>-<id>``): a retried launch first looks for a job of that
name, user and directory and returns it instead of submitting a second one.

Anything slurmrestd cannot answer (unreachable, an error, a job Slurm has purged after
``MinJobAge``) is ``unknown``, never an end: the workflow keeps what it recorded.

Interactive sessions listen where ``sessions.py`` decides (a Unix socket in a directory of
the owner's under the server's ``sessions_dir``), and their directory goes when the job
ends. A job Slurm requeued (its node failed, it was preempted) ends ``failed`` and is
cancelled: a session or a script is never run a second time behind the workflow's back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Literal

import httpx
from pydantic import Field, model_validator

from controllers.base import (
    ComputeResource,
    ExternalAccount,
    Health,
    JobState,
    LaunchRequest,
    PluginSettings,
    SessionEndpoint,
)
from controllers.errors import BackendError, InvalidRequest
from controllers.resources.slurm.adapter import (
    INVALID_JOB_ID,
    SlurmAdapter,
    SlurmApiError,
    SlurmJob,
    SubmitSpec,
)
from controllers.resources.slurm.sessions import SessionDirs
from controllers.resources.slurm.tokens import TokenSource
from controllers.resources.slurm.v0_0_38 import AdapterV0038
from core.status import ENDED_RESOURCE_STATUSES, ResourceStatus

log = logging.getLogger(__name__)

ADAPTERS: dict[str, type[SlurmAdapter]] = {"v0.0.38": AdapterV0038}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JOB_LOG = "job.log"

# Base states (Slurm's job_state) and what they are to us.
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                  "RESIZING"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                 "BOOT_FAIL", "DEADLINE"}

# How far our deadline may pass the end Slurm plans before its limit is raised.
_LIMIT_SLACK_S = 2

# The quickest poll, for a job just submitted.
MIN_POLL_S = 0.1

# Tests set this to hold a launch between the submission and its answer, so a worker can be
# killed exactly there (the retried launch must then find the job, not submit another).
PAUSE_AFTER_SUBMIT_ENV = "UWS_TEST_SLURM_PAUSE_AFTER_SUBMIT_S"


class SlurmSettings(PluginSettings):
    url: str = Field(description="slurmrestd base URL, e.g. http://127.0.0.1:6820")
    api_version: Literal["v0.0.38"] = "v0.0.38"
    auth: Literal["service", "per_user"] = "service"
    service_user: str = Field("root", description="whose token impersonates users "
                              "(root or SlurmUser); also used for the health ping")
    jwt_key_file: str | None = None
    token_env: str | None = None
    token_lifespan_seconds: int = Field(3600, ge=60)
    partition: str | None = None
    gpu_partition: str | None = None
    gpu_gres: str = "gpu:1"
    job_name_prefix: str = "uws"
    path: str = DEFAULT_PATH
    poll_interval_seconds: float = Field(1.0, gt=0)
    request_timeout_seconds: float = Field(10.0, gt=0)
    stop_poll_seconds: float = Field(0.2, gt=0)
    # Interactive sessions listen on a Unix socket in <sessions_dir>/<job id>/ (relative:
    # under UWS_DATA_DIR): the compute node must be this machine (see sessions.py).
    sessions_dir: str = "sessions"
    # The host part of the sessions' passthrough paths (default: this machine's name).
    session_hostname: str = ""

    @model_validator(mode="after")
    def _one_token_source(self) -> SlurmSettings:
        if (self.jwt_key_file is None) == (self.token_env is None):
            raise ValueError("set exactly one of jwt_key_file and token_env")
        if self.auth == "per_user" and self.jwt_key_file is None:
            raise ValueError("auth = 'per_user' mints tokens: it needs jwt_key_file")
        return self


def decode_exit(raw: int | None) -> tuple[int | None, str]:
    """Slurm's ``exit_code`` is a wait status: (shell-style exit code, what it means)."""
    if raw is None:
        return None, ""
    signal_no = raw & 0x7F
    if signal_no:
        return 128 + signal_no, f"killed by signal {signal_no}"
    return raw >> 8, f"exit code {raw >> 8}"


def job_state(job: SlurmJob, now: float) -> JobState:
    """Our view of one Slurm job record."""
    elapsed = 0
    if job.start_time:
        # While running, end_time is only the projected end: use now instead.
        end = job.end_time if job.state not in PENDING_STATES | RUNNING_STATES else now
        elapsed = max(0.0, min(end, now) - job.start_time)
    core_hours = job.cpus * elapsed / 3600
    common: dict[str, Any] = {"core_hours": core_hours, "hostname": job.batch_host or None}
    reason = "" if job.state_reason in ("", "None") else job.state_reason
    if job.restart_count:
        # Slurm requeued it after its node failed or it was preempted (JobRequeue=1, the
        # default; v0.0.38 ignores a submission's "requeue": false). The run we watched is
        # gone: it ends failed, and is cancelled rather than run again behind our back.
        return JobState(status=ResourceStatus.failed,
                        detail=f"Slurm job {job.job_id} was requeued by Slurm (its node "
                        "failed or it was preempted)", **common)
    if job.state in PENDING_STATES:
        return JobState(status=ResourceStatus.pending, detail=reason, **common)
    if job.state in RUNNING_STATES:
        details: dict[str, Any] = {"slurm_job_id": job.job_id, "slurm_state": job.state}
        if job.time_limit_min is not None and job.start_time:
            projected = job.start_time + job.time_limit_min * 60
            details.update(time_limit_min=job.time_limit_min, projected_end_epoch=projected,
                           start_epoch=job.start_time,
                           time_left_seconds=max(0, int(projected - now)))
        return JobState(status=ResourceStatus.running, detail=reason, details=details, **common)
    code, meaning = decode_exit(job.exit_code)
    if job.state == "COMPLETED":
        return JobState(status=ResourceStatus.complete,
                        exit_code=code if code is not None else 0, **common)
    if job.state in FAILED_STATES:
        parts = [f"Slurm job {job.job_id} {job.state}"]
        if reason:
            parts.append(f"reason {reason}")
        if meaning:
            parts.append(meaning)
        return JobState(status=ResourceStatus.failed, detail=", ".join(parts), exit_code=code,
                        **common)
    return JobState(status=ResourceStatus.unknown,
                    detail=f"Slurm job {job.job_id} in state {job.state}")


def raised_limit(limit_min: int, start_epoch: float, deadline_epoch: float) -> int | None:
    """The limit (minutes) a job started at ``start_epoch`` needs to last until our
    deadline, or None when the one it has will do. Slurm reports its start in whole
    seconds, so without an extension our deadline may look a second past its planned end:
    that is no reason to grow it."""
    minutes = math.ceil((deadline_epoch - start_epoch - _LIMIT_SLACK_S) / 60)
    return minutes if minutes > limit_min else None


class SlurmResource(ComputeResource):
    """Batch jobs on a Slurm cluster via slurmrestd (JWT auth)."""

    Settings = SlurmSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s: SlurmSettings = self.settings  # type: ignore[assignment]
        self.adapter = ADAPTERS[s.api_version]()
        self.tokens = TokenSource(key_file=s.jwt_key_file, env_var=s.token_env,
                                  lifespan_s=s.token_lifespan_seconds)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self.sessions = SessionDirs(s.sessions_dir, s.session_hostname
                                    or socket.gethostname().split(".")[0])

    @property
    def s(self) -> SlurmSettings:
        return self.settings  # type: ignore[return-value]

    async def prepare(self) -> None:
        self.sessions.check()

    # --- sessions --------------------------------------------------------------------

    def session_endpoint(self, job_id: int, account: ExternalAccount) -> SessionEndpoint:
        return self.sessions.endpoint(job_id, account)

    async def prepare_session(self, job_id: int, account: ExternalAccount) -> SessionEndpoint:
        endpoint = self.sessions.endpoint(job_id, account)
        await asyncio.to_thread(self.sessions.make, job_id, account)
        return endpoint

    async def _forget_session(self, handle: Mapping[str, Any]) -> None:
        """The job ended: its session's directory (socket, token) goes with it."""
        job_id = handle.get("job_id")
        if isinstance(job_id, int):
            await asyncio.to_thread(self.sessions.remove, job_id)

    # --- HTTP ------------------------------------------------------------------------

    async def _call(self, method: str, path: str, user: str, *,
                    json: dict[str, Any] | None = None,
                    params: dict[str, str] | None = None) -> dict[str, Any]:
        """One request as ``user``; errors in the answer raise ``SlurmApiError``."""
        token_user = self.s.service_user if self.s.auth == "service" else user
        headers = {"X-SLURM-USER-NAME": user,
                   "X-SLURM-USER-TOKEN": self.tokens.token_for(token_user)}
        resp = await self._http().request(method, path, headers=headers, json=json,
                                          params=params)
        try:
            body = resp.json()
        except ValueError:
            body = None
        errors = self.adapter.errors(body)
        if errors or resp.status_code >= 400 or not isinstance(body, dict):
            raise SlurmApiError(resp.status_code, errors, resp.text, body)
        return body

    def _http(self) -> httpx.AsyncClient:
        """One keep-alive client per event loop (a worker polls many jobs every second)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop or self._client.is_closed:
            self._client = httpx.AsyncClient(base_url=self.s.url,
                                             timeout=self.s.request_timeout_seconds)
            self._client_loop = loop
        return self._client

    # --- launch ----------------------------------------------------------------------

    def job_name(self, job_id: int) -> str:
        return f"{self.s.job_name_prefix}-{job_id}"

    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        user = request.account.username
        name = self.job_name(request.job_id)
        spec = self._spec(request, name)
        existing = await self._find(name, user, request.workdir)
        if existing is not None:
            log.info("job %s already submitted as Slurm job %d", request.job_id,
                     existing.job_id)
            return self._handle(request, existing.job_id, spec.cpus,
                                existing.submit_time or time.time())
        try:
            body = await self._call("POST", self.adapter.submit_path(), user,
                                    json=self.adapter.submit_body(spec))
        except SlurmApiError as err:
            # Errors beside a job id (an unsatisfiable request, say) still mean a job exists:
            # keep it, so it is watched and can be stopped, and say why it may not start.
            body = _body_with_job_id(err)
            if body is None and _refused_for_good(err):
                raise InvalidRequest(f"Slurm refused the job: {_descriptions(err)}",
                                     log_message=str(err)) from err
            if body is None:
                raise BackendError("The job could not be submitted to Slurm.",
                                   log_message=str(err)) from err
            log.warning("Slurm accepted job %s with errors: %s", request.job_id, err)
        except httpx.HTTPError as err:
            raise BackendError("Slurm cannot be reached.", log_message=repr(err)) from err
        submitted = time.time()
        slurm_id = self.adapter.submitted_job_id(body)
        pause = os.environ.get(PAUSE_AFTER_SUBMIT_ENV)
        if pause:
            await asyncio.sleep(float(pause))
        return self._handle(request, slurm_id, spec.cpus, submitted)

    def _handle(self, request: LaunchRequest, slurm_id: int, cpus: int,
                submitted: float) -> dict[str, Any]:
        return {"id": slurm_id, "job_id": request.job_id, "user": request.account.username,
                "cpus": cpus, "workdir": request.workdir, "submitted_at": submitted}

    async def _find(self, name: str, user: str, workdir: str) -> SlurmJob | None:
        try:
            body = await self._call("GET", self.adapter.jobs_path(), user)
        except (SlurmApiError, httpx.HTTPError) as err:
            raise BackendError("Slurm cannot be reached.", log_message=str(err)) from err
        mine = [j for j in self.adapter.parse_jobs(body)
                if j.name == name and j.user_name == user and j.workdir == workdir]
        return min(mine, key=lambda j: j.job_id) if mine else None

    def _spec(self, request: LaunchRequest, name: str) -> SubmitSpec:
        opts = request.resource_options
        cpus = self.whole_option(opts, "num_cpus", 1)
        memory = self.whole_option(opts, "memory_mb", None)
        gpu = bool(opts.get(self.parameter_mapping.get("gpu_enabled", "gpu_enabled")))
        limit = request.time_limit_min
        if limit is None:
            limit = self.whole_option(opts, "time_limit_min", None)
        script = request.script
        if not script.startswith("#!"):
            # Without one, Slurm accepts the job and it fails with "Exec format error".
            script = "#!/bin/bash\n" + script
        account = request.account
        env = {"PATH": self.s.path, **request.env}
        env.update(HOME=account.home or request.workdir, USER=account.username,
                   LOGNAME=account.username, UWS_JOB_ID=str(request.job_id))
        return SubmitSpec(
            name=name, script=script, workdir=request.workdir, environment=env, cpus=cpus,
            memory_mb=memory, time_limit_min=None if limit is None else max(1, math.ceil(limit)),
            partition=self.s.gpu_partition if gpu and self.s.gpu_partition else self.s.partition,
            gres=self.s.gpu_gres if gpu else None, comment=f"uws job {request.job_id}",
            standard_output=os.path.join(request.workdir, JOB_LOG),
        )

    # --- poll / wait -----------------------------------------------------------------

    async def poll(self, handle: Mapping[str, Any]) -> JobState:
        slurm_id, user = int(handle["id"]), str(handle["user"])
        try:
            body = await self._call("GET", self.adapter.job_path(slurm_id), user)
        except SlurmApiError as err:
            if INVALID_JOB_ID in err.numbers:
                return JobState(status=ResourceStatus.unknown,
                                detail=f"Slurm no longer knows job {slurm_id} (purged?)")
            return JobState(status=ResourceStatus.unknown, detail=str(err)[:300])
        except (httpx.HTTPError, OSError, RuntimeError) as err:
            return JobState(status=ResourceStatus.unknown,
                            detail=f"slurmrestd unreachable: {err!r:.200}")
        jobs = [j for j in self.adapter.parse_jobs(body) if j.job_id == slurm_id]
        if not jobs:
            return JobState(status=ResourceStatus.unknown,
                            detail=f"Slurm returned no record of {slurm_id}")
        state = job_state(jobs[0], time.time())
        if jobs[0].restart_count and jobs[0].state not in FAILED_STATES | {"COMPLETED"}:
            await self._cancel_requeued(slurm_id, user)
        if state.status in ENDED_RESOURCE_STATUSES:
            await self._forget_session(handle)
        return state

    async def _cancel_requeued(self, slurm_id: int, user: str) -> None:
        try:
            await self._delete(self.adapter.job_path(slurm_id), user, None)
        except BackendError as err:  # polled again soon: cancelled then
            log.warning("could not cancel requeued Slurm job %d: %s", slurm_id,
                        err.log_message)
        else:
            log.info("cancelled Slurm job %d: Slurm requeued it", slurm_id)

    async def wait(self, handle: Mapping[str, Any], timeout: float) -> JobState:
        """Poll every ``poll_interval_seconds`` until the state changes (an end, or pending
        to running), or ``timeout`` passes: ends are noticed within about a poll."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        first = await self.poll(handle)
        state = first
        while state.status not in ENDED_RESOURCE_STATUSES:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(self._interval(handle), remaining))
            state = await self.poll(handle)
            if state.status != first.status:
                break
        return state

    def _interval(self, handle: Mapping[str, Any]) -> float:
        """Quick polls while a job is young (most start within a second of submission),
        easing to ``poll_interval_seconds`` as it ages."""
        age = time.time() - float(handle.get("submitted_at") or 0)
        return min(max(age / 4, MIN_POLL_S), self.s.poll_interval_seconds)

    # --- time limit ------------------------------------------------------------------

    async def ensure_time_limit(self, handle: Mapping[str, Any], deadline_epoch: float,
                                state: JobState) -> None:
        """Raise the Slurm job's limit when our deadline moved past the end Slurm plans.
        Only operators may raise a limit in Slurm, so the service user asks (with
        ``auth = "per_user"`` the user asks, and Slurm refuses: logged, and the job then
        ends at its original limit)."""
        limit = state.details.get("time_limit_min")
        start = state.details.get("start_epoch")
        if not isinstance(limit, int) or not isinstance(start, int | float):
            return
        minutes = raised_limit(limit, start, deadline_epoch)
        if minutes is None:
            return
        slurm_id = int(handle["id"])
        asker = self.s.service_user if self.s.auth == "service" else str(handle["user"])
        try:
            await self._call("POST", self.adapter.job_path(slurm_id), asker,
                             json=self.adapter.time_limit_body(minutes))
        except (SlurmApiError, httpx.HTTPError) as err:
            log.warning("could not raise the time limit of Slurm job %d to %d min: %s",
                        slurm_id, minutes, err)
            return
        log.info("Slurm job %d time limit raised to %d min", slurm_id, minutes)

    # --- stop ------------------------------------------------------------------------

    async def stop(self, handle: Mapping[str, Any], grace_seconds: float) -> None:
        """SIGTERM to the whole job, up to ``grace_seconds`` to end, then cancel."""
        slurm_id, user = int(handle["id"]), str(handle["user"])
        path = self.adapter.job_path(slurm_id)
        try:
            await self._stop(handle, path, user, grace_seconds)
        finally:
            await self._forget_session(handle)

    async def _stop(self, handle: Mapping[str, Any], path: str, user: str,
                    grace_seconds: float) -> None:
        slurm_id = int(handle["id"])
        state = await self.poll(handle)
        if state.status in ENDED_RESOURCE_STATUSES:
            return
        # Slurm refuses to signal a job that has not started ("Job can not be altered
        # now"): a pending job is cancelled at once, there is nothing to end gracefully.
        if state.status == ResourceStatus.pending or grace_seconds <= 0:
            await self._delete(path, user, None)
            return
        try:
            if not await self._delete(path, user, {"signal": "SIGTERM"}):
                return
        except BackendError as err:
            log.warning("SIGTERM to Slurm job %d failed (%s); cancelling", slurm_id,
                        err.log_message)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while loop.time() < deadline:
            state = await self.poll(handle)
            if state.status in ENDED_RESOURCE_STATUSES:
                return
            await asyncio.sleep(self.s.stop_poll_seconds)
        await self._delete(path, user, None)

    async def abandon(self, job_id: int, workdir: str, account: ExternalAccount) -> float:
        found = await self._find(self.job_name(job_id), account.username, workdir)
        if found is not None:
            await self._delete(self.adapter.job_path(found.job_id), account.username, None)
        await asyncio.to_thread(self.sessions.remove, job_id)
        if found is None:
            return 0.0
        # As found, just before its cancellation: the time it had run.
        return job_state(found, time.time()).core_hours or 0.0

    async def _delete(self, path: str, user: str, params: dict[str, str] | None) -> bool:
        """False when Slurm does not know the job (already gone)."""
        try:
            await self._call("DELETE", path, user, params=params)
        except SlurmApiError as err:
            if INVALID_JOB_ID in err.numbers:
                return False
            raise BackendError("The Slurm job could not be cancelled.",
                               log_message=str(err)) from err
        except httpx.HTTPError as err:
            raise BackendError("Slurm cannot be reached.", log_message=repr(err)) from err
        return True

    # --- misc ------------------------------------------------------------------------

    async def health(self) -> Health:
        try:
            body = await self._call("GET", self.adapter.ping_path(), self.s.service_user)
        except (SlurmApiError, httpx.HTTPError, OSError, RuntimeError) as err:
            return Health(ok=False, detail=f"slurmrestd: {err}"[:300])
        up = self.adapter.ping_ok(body)
        return Health(ok=up, detail="" if up else "slurmctld is not UP")


def _refused_for_good(err: SlurmApiError) -> bool:
    """Slurm itself judged the request (an invalid partition, more CPUs than any node):
    its ESLURM_* errors (2000-3999). Communication and protocol errors (1000s, 5000s) and
    answers without an error number may pass on a retry."""
    return bool(err.numbers) and all(2000 <= n < 4000 for n in err.numbers)


def _descriptions(err: SlurmApiError) -> str:
    texts = [str(e.get("description") or e.get("error") or "") for e in err.errors]
    return "; ".join(t for t in texts if t)[:300] or str(err)


def _body_with_job_id(err: SlurmApiError) -> dict[str, Any] | None:
    """The answer of a submission that produced a job despite errors, if it did."""
    ok = err.status_code == 200 and isinstance(err.body, dict)
    return err.body if ok and isinstance(err.body.get("job_id"), int) else None
