"""Start-up validation of the sign-in settings, unreachable providers and the identity
cache, on the plugins themselves (no app needed)."""

from __future__ import annotations

import tomllib

import jwt
import pytest

from controllers.auth.external import IdentityCache
from controllers.auth.globus import GlobusUserAuthentication
from controllers.auth.oidc import OIDCUserAuthentication
from controllers.base import UserInfo
from controllers.errors import Unavailable
from core.config import ConfigError
from tests.conftest import TESTS, free_port
from tests.identity.conftest import SECRET_ENV, build_from, config_text
from tests.identity.fake_provider import ec_key

KEY = "available_user_authentication.oidc.connection_details"


def build_with(idp_secret, **changes):
    """The JWT test config with ``changes`` to the OIDC method's settings."""
    from controllers.registry import build_controllers
    from core.config import parse_config

    data = tomllib.loads(config_text("identity-oidc-jwt.toml", "http://127.0.0.1:9"))
    details = data["available_user_authentication"]["oidc"]["connection_details"]
    for key, value in changes.items():
        if value is None:
            details.pop(key, None)
        else:
            details[key] = value
    return build_controllers(parse_config(data, "identity.toml"), file="identity.toml",
                             data_dir=TESTS)


@pytest.mark.parametrize(("changes", "key", "reason"), [
    ({"algorithms": ["RS256", "HS256"]}, f"{KEY}.algorithms", "HS256"),
    ({"algorithms": ["none"]}, f"{KEY}.algorithms", "none"),
    ({"jwks_url": None, "discovery": False}, KEY, "needs jwks_url"),
    ({"jwks_url": None, "issuer": ""}, KEY, "needs jwks_url, issuer"),
    ({"audience": []}, f"{KEY}.audience", "at least 1"),
    ({"mode": "introspection"}, KEY, "needs client_id, client_secret_env"),
    ({"mode": "introspection", "discovery": False}, KEY,
     "introspection_url, client_id, client_secret_env"),
    ({"client_secret_env": "UWS_TEST_NOT_SET_ANYWHERE"}, f"{KEY}.client_secret_env",
     "'UWS_TEST_NOT_SET_ANYWHERE' is not set"),
    ({"audiance": ["uws"]}, f"{KEY}.audiance", "Extra inputs are not permitted"),
])
def test_bad_settings_fail_at_start_naming_the_key(idp_secret, changes, key, reason) -> None:
    with pytest.raises(ConfigError) as caught:
        build_with(idp_secret, **changes)
    assert caught.value.key_path == key
    assert reason in caught.value.reason


def test_globus_secret_must_be_in_the_environment(idp_secret, monkeypatch) -> None:
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(ConfigError) as caught:
        build_from("identity-globus.toml", "http://127.0.0.1:9", TESTS)
    assert caught.value.key_path == (
        "available_user_authentication.globus.connection_details.client_secret_env")


@pytest.mark.parametrize("config", ["identity-globus.toml", "identity-oidc-introspection.toml",
                                    "identity-oidc-jwt.toml"])
async def test_unreachable_provider_is_unavailable(idp_secret, config) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    auth = build_from(config, closed, TESTS).api_auth
    assert isinstance(auth, GlobusUserAuthentication | OIDCUserAuthentication)
    key = ec_key("k1")
    token = jwt.encode({"aud": "uws"}, key.private, algorithm="ES256",
                       headers={"kid": "k1", "typ": "at+jwt"})
    with pytest.raises(Unavailable) as caught:
        await auth.identify({"auth_token": token}, _no_client)
    assert caught.value.user_message.startswith("The identity provider is unavailable")


async def test_jwks_endpoint_failing_is_unavailable(provider) -> None:
    auth = build_from("identity-oidc-jwt.toml", provider.issuer, TESTS).api_auth
    provider.fail_with = 502
    with pytest.raises(Unavailable):
        await auth.identify({"auth_token": provider.sign({"aud": "uws"}, provider.rsa)},
                            _no_client)


def test_identity_cache_is_bounded_and_honours_expiry() -> None:
    import time

    cache = IdentityCache(ttl=60, size=2)
    people = [UserInfo(username=f"u{i}", email=f"u{i}@x") for i in range(3)]
    for i, info in enumerate(people):
        cache.put(f"token{i}", info, None)
    assert cache.get("token0") is None  # evicted, least recently used
    assert cache.get("token2") == people[2]
    cache.put("expired", people[0], time.time() - 1)
    assert cache.get("expired") is None
    # Kept under the token's hash, never under the token itself.
    assert cache._cache.get("token2") is None
    assert cache._cache.get(IdentityCache.key("token2")) == people[2]


async def _no_client(_: str) -> bool:
    return False


CONFIGS = ["identity-globus.toml", "identity-oidc-introspection.toml", "identity-oidc-jwt.toml"]


@pytest.mark.parametrize("config", CONFIGS)
async def test_health_probes_the_provider_and_caches_it(provider, config) -> None:
    auth = build_from(config, provider.issuer, TESTS).api_auth
    before = sum(provider.hits.values())
    assert (await auth.health()).ok
    assert sum(provider.hits.values()) == before + 1
    # /status/ polled again at once: the answer is the cached one, no second probe.
    provider.fail_with = 503
    assert (await auth.health()).ok
    assert sum(provider.hits.values()) == before + 1
    # A fresh plugin (no cache) sees the provider in trouble.
    health = await build_from(config, provider.issuer, TESTS).api_auth.health()
    assert not health.ok and health.detail


@pytest.mark.parametrize("config", CONFIGS)
async def test_health_of_unreachable_provider(idp_secret, config) -> None:
    auth = build_from(config, f"http://127.0.0.1:{free_port()}", TESTS).api_auth
    health = await auth.health()
    assert not health.ok and "ConnectError" in health.detail


async def test_health_when_the_provider_refuses_our_client(provider) -> None:
    auth = build_from("identity-oidc-introspection.toml", provider.issuer, TESTS).api_auth
    saved = provider.clients["uws-rs"]
    provider.clients["uws-rs"] = "rotated-secret"
    try:
        health = await auth.health()
    finally:
        provider.clients["uws-rs"] = saved
    assert not health.ok and "401" in health.detail
