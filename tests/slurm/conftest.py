"""A real single-node Slurm cluster (core/slurm_dev.py) on free loopback ports, and the
app + worker wired to it by tests/data/slurm-config.toml, on their own task queue. All of
it lives for this directory only (package scope) and is gone before other tests run.

Every test here is skipped, with one reason, when the Slurm packages are missing or the
tests do not run as root (slurmd starts jobs as other users; users are created).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from app import slurm_dev
from app.stack import UWS, Child, UwsStack
from controllers.resources.slurm.resource import PAUSE_AFTER_SUBMIT_ENV
from core.settings import Settings
from tests.conftest import TESTS, eventually, free_port

SLURM_CONFIG = TESTS / "data" / "slurm-config.toml"
ROOT = TESTS.parent
USER_PREFIX = "uwsslurm"
_created_users: list[str] = []


def _skip_reason() -> str | None:
    if not slurm_dev.installed():
        return f"Slurm not installed: {slurm_dev.ENABLE_HINT}"
    if os.geteuid() != 0:
        return "Slurm tests need root (slurmd runs jobs as the users the tests create)"
    return None


@pytest.fixture(scope="package")
def slurm_root() -> Iterator[Path]:
    """One directory for the cluster's state and the server's data, under /tmp rather than
    pytest's 0700 temp dir: job users must be able to reach their workspaces."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="uws-slurm-test-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="package")
def slurm_cluster(slurm_root: Path) -> Iterator[slurm_dev.DevCluster]:
    cluster = slurm_dev.DevCluster(
        state_dir=slurm_root / "slurm", rest_port=free_port(), ctld_port=free_port(),
        slurmd_port=free_port(), cpus=4,  # more than the machine's 2: tests overlap jobs
    )
    slurm_dev.start(cluster, install_missing=False)
    yield cluster
    slurm_dev.stop(cluster)


# A session type that idle culling stops within seconds, for the tests only.
IDLE_JOB_TYPE = "jupyter_lab_idle"
IDLE_MINUTES = 0.25
_IDLE_TYPE = f"""
[available_job_types.{IDLE_JOB_TYPE}]
name = "Jupyter Lab, stopped when idle"
job_type = "JupyterLabJob"
environment_details.slurm_resource = {{ python = "", idle_timeout_minutes = {IDLE_MINUTES} }}
"""


@pytest.fixture(scope="package")
def slurm_config_file(slurm_root: Path, slurm_cluster: slurm_dev.DevCluster) -> Path:
    text = SLURM_CONFIG.read_text()
    text = text.replace('"http://127.0.0.1:6820"', f'"{slurm_cluster.rest_url}"')
    text = text.replace('"/tmp/uws-slurm-dev/etc/jwt_hs256.key"', f'"{slurm_cluster.jwt_key}"')
    path = slurm_root / "config.toml"
    path.write_text(text + _IDLE_TYPE)
    return path


@pytest.fixture(scope="package")
def slurm_settings(database_url: str, slurm_root: Path, slurm_config_file: Path) -> Settings:
    data = slurm_root / "data"
    data.mkdir(mode=0o755, exist_ok=True)
    return Settings(database_url=database_url, data_dir=data, config=slurm_config_file,
                    task_queue=f"uws-slurm-{secrets.token_hex(4)}", token_cache_seconds=0)


@pytest.fixture(scope="package")
def slurm_controllers(slurm_settings: Settings):
    from app.controllers import load_controllers

    return load_controllers(slurm_settings)


def slurm_env(temporal_env, settings: Settings) -> dict[str, str]:
    """The environment of a ``uws api``/``uws worker`` process wired to the cluster."""
    env = {**os.environ, "UWS_DATABASE_URL": str(settings.database_url),
           "UWS_DATA_DIR": str(settings.data_dir), "UWS_CONFIG": str(settings.config),
           "UWS_TASK_QUEUE": settings.task_queue, "UWS_TOKEN_CACHE_SECONDS": "0",
           "UWS_TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host}
    env.pop(PAUSE_AFTER_SUBMIT_ENV, None)
    return env


def uws_worker(env: dict[str, str], log: Path) -> Child:
    """A ``uws worker`` process of its own (started), with ``env``."""
    worker = Child("worker", [*UWS, "worker"], log, env=env)
    worker.start()
    return worker


@pytest.fixture(scope="package")
def slurm_stack(temporal_env, slurm_settings: Settings, slurm_root: Path,
                engine) -> Iterator[UwsStack]:
    """``uws worker`` and ``uws api`` as processes of their own: an app in this process
    would rebind the database tables to its own engine (and close it when it stops)."""
    env = slurm_env(temporal_env, slurm_settings)
    stack = UwsStack(env=env, database_url=env["UWS_DATABASE_URL"],
                     data_dir=Path(env["UWS_DATA_DIR"]),
                     temporal_address=env["UWS_TEMPORAL_ADDRESS"], logs=slurm_root)
    try:
        yield stack.start()
    finally:
        stack.close()


@pytest.fixture(scope="package")
def slurm_server_url(slurm_stack: UwsStack) -> str:
    return slurm_stack.api_url()


@pytest.fixture(scope="package")
async def slurm_client(slurm_server_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=slurm_server_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="package")
async def slurm_api_key(slurm_client, engine) -> AsyncIterator[str]:
    from db.accounts import create_client

    yield await create_client(f"portal-{secrets.token_hex(4)}")
    # Leave the shared database as other tests expect it: their upkeep scans every
    # workspace row, and ours live outside their storage root. Rows of a user cascade.
    from db.tables import User

    if _created_users:
        await User.delete().where(User.username.is_in(_created_users))
    # The OS accounts POST /tokens/ created for these users.
    for name in _created_users:
        subprocess.run(["userdel", "--remove", name], capture_output=True)


class SlurmUser:
    """A user of the API, with the real OS account that runs their Slurm jobs."""

    def __init__(self, name: str, token: str) -> None:
        self.name = name
        self.headers = {"UWS-Authorization": f"Token {token}"}


async def make_slurm_user(client: httpx.AsyncClient, api_key: str) -> SlurmUser:
    """A new user signed in through the portal flow (their OS account is created)."""
    name = f"{USER_PREFIX}{secrets.token_hex(4)}"
    _created_users.append(name)
    r = await client.post("/tokens/", json={
        "client_token": api_key,
        "user_info": {"username": name, "email": f"{name}@example.org"},
    })
    assert r.status_code == 200, r.text
    return SlurmUser(name, r.json()["token"])


@pytest.fixture
async def slurm_user(slurm_client: httpx.AsyncClient, slurm_api_key: str) -> SlurmUser:
    return await make_slurm_user(slurm_client, slurm_api_key)


@pytest.fixture
def slurm_rest(slurm_cluster: slurm_dev.DevCluster) -> httpx.AsyncClient:
    """Slurm's own REST API as root, for looking behind our back."""
    return httpx.AsyncClient(
        base_url=f"{slurm_cluster.rest_url}/slurm/{slurm_dev.API_VERSION}", timeout=10,
        headers={"X-SLURM-USER-NAME": "root",
                 "X-SLURM-USER-TOKEN": slurm_dev.token(slurm_cluster, "root", 7200)})


async def start_job(client: httpx.AsyncClient, user: SlurmUser, job_type: str,
                    job_details: dict | None = None, **options: object) -> dict:
    r = await client.post("/workspaces/", headers=user.headers,
                          json={"name": f"ws-{secrets.token_hex(3)}", "description": "slurm"})
    assert r.status_code == 200, r.text
    ws = r.json()["data"]["workspace"]
    r = await client.put(f"/workspaces/{ws['id']}/start/", headers=user.headers, json={
        "job_type": job_type, "job_details": job_details or {}, "resource_options": options})
    assert r.status_code == 200, r.text
    return r.json()["data"]["job"]


async def job_of(client: httpx.AsyncClient, user: SlurmUser, job_id: int) -> dict:
    r = await client.get(f"/jobs/{job_id}/", headers=user.headers)
    assert r.status_code == 200, r.text
    return r.json()["data"]["jobs"][0]


async def wait_job(client: httpx.AsyncClient, user: SlurmUser, job_id: int, *statuses: str,
                   timeout: float = 60) -> dict:
    async def check():
        job = await job_of(client, user, job_id)
        return job if job["status"] in statuses else None

    return await eventually(check, timeout=timeout, interval=0.1)


async def slurm_jobs_named(rest: httpx.AsyncClient, name: str) -> list[dict]:
    with contextlib.suppress(httpx.HTTPError):
        r = await rest.get("/jobs")
        return [j for j in r.json()["jobs"] if j["name"] == name]
    return []


async def record_history(temporal_env, job_id: int, name: str, slurm_root: Path) -> None:
    """With ``UWS_RECORD_HISTORIES=1``, add the job's workflow history to the replay
    corpus as a new recording of ``name`` (never over an older one), with this machine's
    paths scrubbed (replay reads no paths)."""
    from tests.replay.recording import HISTORIES, REPO, write_new
    from workflows.models import job_workflow_id

    if os.environ.get("UWS_RECORD_HISTORIES") != "1":
        return
    handle = temporal_env.client.get_workflow_handle(job_workflow_id(job_id))
    await handle.result()
    text = (await handle.fetch_history()).to_json()
    scrub = {str(REPO): "/repo", str(slurm_root): "/tmp/uws-slurm-test"}
    write_new(HISTORIES, name, scrub_history(text, scrub))


def scrub_history(text: str, replace: dict[str, str]) -> str:
    """Replace paths in the history's text and inside its base64 payloads (workdirs)."""
    def fix(value: str) -> str:
        for old, new in replace.items():
            value = value.replace(old, new)
        return value

    def walk(node: object) -> object:
        if isinstance(node, dict):
            if isinstance(node.get("data"), str) and "metadata" in node:
                with contextlib.suppress(ValueError):
                    raw = base64.b64decode(node["data"], validate=True).decode()
                    node["data"] = base64.b64encode(fix(raw).encode()).decode()
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return fix(node) if isinstance(node, str) else node

    return json.dumps(walk(json.loads(text)), indent=2)
