"""``uws dev``'s banner shows the sign-in request of the method actually configured."""

from __future__ import annotations

import tomllib

from app.dev_banner import banner
from core.config import parse_config
from tests.conftest import TESTS


def _api_auth(config: str, provider: str = "https://idp.example.org"):
    from controllers.registry import build_controllers

    path = TESTS / "data" / config
    data = tomllib.loads(path.read_text().replace("@PROVIDER@", provider))
    return build_controllers(parse_config(data, path), file=str(path), data_dir=TESTS).api_auth


def _banner(method) -> str:
    return banner(method=method, api="http://127.0.0.1:9000", temporal_ui="http://x:8233",
                  data_dir="/d", client_name="dev", client_token="KEY123")


def test_local_method_gets_the_api_client_request() -> None:
    text = _banner(_api_auth("test-config.toml"))
    assert '"client_token": "KEY123"' in text and '"user_info"' in text
    assert "http://127.0.0.1:9000/tokens/" in text
    assert "auth_token" not in text


def test_provider_method_gets_the_auth_token_request() -> None:
    text = _banner(_api_auth("identity-oidc-jwt.toml"))
    assert '"auth_token": "<access token>"' in text
    assert "client_token\":" not in text
    # Says where such a token comes from.
    assert "audience 'uws' from https://idp.example.org" in text
