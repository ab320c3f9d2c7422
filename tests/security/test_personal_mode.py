"""Attacks on personal mode (one person's server): running it as root, and a second
person signing in."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import TEST_CONFIG


def test_personal_mode_is_refused_as_root(tmp_path: Path) -> None:
    """An operator (or a config change) runs the server in personal mode as
    root, where every job would run as root. Building the controllers refuses."""
    from app.controllers import load_controllers
    from core.config import ConfigError
    from core.settings import Settings

    text = TEST_CONFIG.read_text()
    assert 'accounts = "multi_user"' in text
    config = tmp_path / "personal.toml"
    config.write_text(text.replace('accounts = "multi_user"', 'accounts = "personal"'))
    assert os.geteuid() == 0
    with pytest.raises(ConfigError) as caught:
        load_controllers(Settings(config=config, data_dir=tmp_path, database_url=None))
    assert caught.value.key_path == (
        "available_user_authentication.local_auth.connection_details.accounts")
    assert "root" in caught.value.reason


@pytest.fixture
async def no_personal_owner(engine) -> AsyncIterator[None]:
    """The single-row owner table of this test database, empty before and after."""
    from db.tables import PersonalOwner

    await PersonalOwner.delete(force=True)
    yield
    await PersonalOwner.delete(force=True)


async def test_personal_owner_is_the_first_and_only(no_personal_owner) -> None:
    """A second person signs in to a personal server, hoping to become its
    owner too (or instead)."""
    from db.accounts import claim_personal_owner

    assert await claim_personal_owner("alice") == "alice"
    assert await claim_personal_owner("bob") == "alice"
    assert await claim_personal_owner("alice") == "alice"


class _PersonalView:
    """The configured auth method as a personal server's: it serves one person."""

    serves_one_person = True

    def __init__(self, real) -> None:
        self.name = real.name
        self.identify = real.identify
        self.ensure_external_account = real.ensure_external_account


async def test_personal_server_refuses_a_second_user_token(
    client, api_client_key, app, no_personal_owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through ``POST /tokens/`` of a personal server, a portal asks a key for
    a second person. Only the tokens route sees the personal auth (the resource keeps its
    multi-user one), by replacing what that route reads from the app state."""
    from api.routes import tokens
    from db.accounts import claim_personal_owner

    real = app.app.state.uws.controllers.api_auth
    state = SimpleNamespace(controllers=SimpleNamespace(api_auth=_PersonalView(real)))
    monkeypatch.setattr(tokens, "app_state", lambda request: state)
    owner = f"alice{secrets.token_hex(3)}"
    assert await claim_personal_owner(owner) == owner

    def body(username: str) -> dict[str, Any]:
        return {"client_token": api_client_key,
                "user_info": {"username": username, "email": f"{username}@example.org",
                              "first_name": username, "last_name": "T"}}

    r = await client.post("/tokens/", json=body(f"bob{secrets.token_hex(3)}"))
    assert r.status_code == 403, r.text
    assert r.json() == {"success": False,
                        "message": f"This server is in personal mode: it serves only {owner}."}
    r = await client.post("/tokens/", json=body(owner))  # the owner still signs in
    assert r.status_code == 200, r.text
    assert r.json()["token"]
