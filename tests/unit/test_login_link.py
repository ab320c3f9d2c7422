"""``uws login-link``: who it may create."""

from __future__ import annotations

import secrets

import pytest

from app.login_link import UnknownUser, login_link
from tests.unit.test_dev_banner import _api_auth


async def test_no_account_is_made_outside_the_identity_provider(database_url, engine) -> None:
    import dataclasses

    from db.accounts import user_id_named

    auth = _api_auth("identity-oidc-jwt.toml")
    controllers = dataclasses.make_dataclass("C", ["api_auth"])(auth)
    name = f"nobody{secrets.token_hex(3)}"
    with pytest.raises(UnknownUser) as refused:
        await login_link(database_url, controllers, name, email=f"{name}@example.org",
                         base_url="http://127.0.0.1:1", minutes=1)
    assert "first sign-in" in str(refused.value)
    assert await user_id_named(name) is None
