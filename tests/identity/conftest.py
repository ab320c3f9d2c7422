"""Fixtures for sign-in through external identity providers.

One fake provider (``fake_provider.py``) on loopback for the session, and one app per sign-in
method, each built from its own config under ``tests/data/`` (the provider's URL filled in),
on the session's real database and Temporal, served by uvicorn.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import subprocess
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.conftest import TEST_ACCOUNT_COMMENT, TESTS, free_port
from tests.identity.fake_provider import FakeProvider

SECRET_ENV = "UWS_TEST_IDP_SECRET"
SECRET = "s3cret-for-tests"
GLOBUS_CLIENT = "uws-globus-client"
ALLOWED_GROUP = "6f9c2a52-0000-4000-8000-00000000beef"
# The OS account the Globus config's account_map sends its identities to (@OS_USER@):
# a real unprivileged account of this run, never the test process's own (root), which
# no user may be given. Created by ``mapped_os_user``, removed with the run's others.
MAPPED_OS_USER = f"uwsglobus{secrets.token_hex(3)}"


@asynccontextmanager
async def serve(app: Any, lifespan: str = "on") -> AsyncIterator[str]:
    """``app`` on a free loopback port in this event loop; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan=lifespan))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture(scope="session")
def idp_secret() -> Iterator[str]:
    os.environ[SECRET_ENV] = SECRET
    yield SECRET
    os.environ.pop(SECRET_ENV, None)


@pytest.fixture(scope="session")
async def provider(idp_secret: str) -> AsyncIterator[FakeProvider]:
    idp = FakeProvider(clients={"uws-rs": idp_secret, GLOBUS_CLIENT: idp_secret})
    async with serve(idp, lifespan="off") as url:
        idp.issuer = url
        yield idp


@pytest.fixture(autouse=True)
def provider_up(request: pytest.FixtureRequest) -> Any:
    """A test that makes the provider fail cannot leave it failing for the next one."""
    yield
    if "provider" in request.fixturenames:
        idp = request.getfixturevalue("provider")
        idp.fail_with = None
        idp.unknown_token_answer = None
        idp.discovery.clear()
        idp.userinfo_sub = None


@pytest.fixture(scope="session")
def mapped_os_user() -> pwd.struct_passwd:
    """``MAPPED_OS_USER``, tagged like every account sign-ins create in this run."""
    try:
        return pwd.getpwnam(MAPPED_OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--comment", TEST_ACCOUNT_COMMENT,
                        MAPPED_OS_USER], check=True, capture_output=True)
        return pwd.getpwnam(MAPPED_OS_USER)


def config_text(name: str, provider_url: str) -> str:
    text = (TESTS / "data" / name).read_text()
    return text.replace("@PROVIDER@", provider_url).replace("@OS_USER@", MAPPED_OS_USER)


def _config(name: str, provider_url: str, changes: dict[str, Any]) -> Any:
    """Config ``name`` parsed, with ``changes`` to its api auth method's settings (``None``
    removes a key)."""
    from core.config import parse_config

    data = tomllib.loads(config_text(name, provider_url))
    method = data["api_user_authentication"]
    details = data["available_user_authentication"][method]["connection_details"]
    for key, value in changes.items():
        if value is None:
            details.pop(key, None)
        else:
            details[key] = value
    return parse_config(data, TESTS / "data" / name)


def build_from(name: str, provider_url: str, data_dir: Path, **changes: Any):
    from controllers.registry import build_controllers

    return build_controllers(_config(name, provider_url, changes),
                             file=str(TESTS / "data" / name), data_dir=data_dir)


def build_auth(name: str, provider_url: str, **changes: Any) -> Any:
    """The api auth method of config ``name`` with ``changes`` to its settings, built
    alone: for checks on the plugin itself."""
    return build_from(name, provider_url, TESTS, **changes).api_auth


def stable_sub(username: str) -> str:
    """One person's subject at the provider: the same for every token of ``username``."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"uws-test:{username}"))


def _app_fixture(config_name: str) -> Callable[..., Any]:
    # Module scope: each auth method's app serves its own module's tests.
    @pytest.fixture(scope="module")
    async def fixture(provider, settings, data_dir, temporal_env, engine, mapped_os_user
                      ) -> AsyncIterator[httpx.AsyncClient]:
        from api.app import create_app

        controllers = build_from(config_name, provider.issuer, data_dir)
        app = create_app(settings, controllers=controllers, temporal=temporal_env.client)
        async with (serve(app) as url,
                    httpx.AsyncClient(base_url=url, timeout=30) as client):
            client.controllers = controllers  # type: ignore[attr-defined]
            yield client
    return fixture


globus_client = _app_fixture("identity-globus.toml")
introspection_client = _app_fixture("identity-oidc-introspection.toml")
jwt_client = _app_fixture("identity-oidc-jwt.toml")


async def sign_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/tokens/", json={"auth_token": token})


async def assert_works(client: httpx.AsyncClient, token: str) -> str:
    """Sign in with a provider token, then use the UWS key on an authenticated endpoint."""
    r = await sign_in(client, token)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["message"] == "Successful authentication."
    key = body["token"]
    r = await client.get("/workspaces/", headers={"UWS-Authorization": f"Token {key}"})
    assert r.status_code == 200, r.text
    return key


async def assert_refused(client: httpx.AsyncClient, token: str) -> None:
    r = await sign_in(client, token)
    assert r.status_code == 401, r.text
    assert r.json() == {"success": False, "message": "Incorrect authentication credentials."}


async def assert_taken(client: httpx.AsyncClient, token: str, username: str) -> None:
    """A new identity naming another account's username: 409, never that account's key."""
    r = await sign_in(client, token)
    assert r.status_code == 409, r.text
    assert r.json() == {"success": False, "message": (
        f"The username {username} is already used by another account. Sign in with the "
        "identity that created it, or ask an administrator to link or rename it.")}


async def identity_of(username: str) -> list[dict[str, Any]]:
    """The identities bound to ``username``'s account, one per sign-in method."""
    from db.sql import as_json
    from db.tables import ExternalUserMapping, User

    user = await User.select(User.id).where(User.username == username).first()
    if user is None:
        return []
    rows = await ExternalUserMapping.select(ExternalUserMapping.external_user_details).where(
        ExternalUserMapping.user == user["id"])
    return [as_json(r["external_user_details"]).get("identity") for r in rows
            if as_json(r["external_user_details"]).get("identity")]


async def assert_forbidden(client: httpx.AsyncClient, token: str, message: str) -> None:
    """Signed in but not admitted (a group is missing): 403 and no token."""
    r = await sign_in(client, token)
    assert r.status_code == 403, r.text
    assert r.json() == {"success": False, "message": message}


async def user_row(username: str) -> dict[str, Any] | None:
    from db.tables import User

    return await User.select(User.username, User.email, User.first_name, User.last_name
                             ).where(User.username == username).first()
