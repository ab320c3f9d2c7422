"""Endpoints from the issuer's discovery document, and claims a token lacks from userinfo
(against the loopback fake provider; ``test_real_provider.py`` does both against a
certified one)."""

from __future__ import annotations

import secrets

import pytest

from controllers.auth.oidc import MISSING_CLAIM, NOT_IN_GROUP
from controllers.errors import AuthenticationFailed, BackendError, Forbidden, Unavailable
from tests.identity.conftest import build_auth, stable_sub

JWT_CONFIG = "identity-oidc-jwt.toml"
INTROSPECTION_CONFIG = "identity-oidc-introspection.toml"


async def _no_client(_: str) -> bool:
    return False


def only_sub(username: str, **extra) -> dict:
    """An access token as many providers issue it: who (sub) and for what (aud), no profile."""
    return {"sub": stable_sub(username), "aud": "uws", **extra}


def profile(username: str) -> dict:
    return {"preferred_username": username, "email": f"{username}@example.org",
            "given_name": "Ada", "groups": ["researchers"]}


async def test_jwt_mode_with_only_the_issuer_discovers_the_keys(provider) -> None:
    auth = build_auth(JWT_CONFIG, provider.issuer, jwks_url=None)
    name = f"disc{secrets.token_hex(3)}"
    token = provider.sign({**only_sub(name), **profile(name)}, provider.rsa)
    before = provider.hits.get("/.well-known/openid-configuration", 0)
    info = await auth.identify({"auth_token": token}, _no_client)
    assert (info.username, info.subject) == (name, stable_sub(name))
    assert provider.hits["/.well-known/openid-configuration"] == before + 1
    # Read once, kept: a second sign-in does not ask again.
    other = provider.sign({**only_sub(name), **profile(name)}, provider.ec)
    await auth.identify({"auth_token": other}, _no_client)
    assert provider.hits["/.well-known/openid-configuration"] == before + 1
    assert (await auth.health()).ok


async def test_introspection_mode_discovers_its_endpoint(provider, idp_secret) -> None:
    auth = build_auth(INTROSPECTION_CONFIG, provider.issuer, introspection_url=None)
    name = f"disc{secrets.token_hex(3)}"
    token = provider.issue({"sub": stable_sub(name), "aud": "uws-rs", "iss": provider.issuer,
                            "username": name, "email": f"{name}@example.org",
                            "memberOf": ["researchers"]})
    info = await auth.identify({"auth_token": token}, _no_client)
    assert info.username == name


async def test_a_document_naming_another_issuer_is_refused(provider) -> None:
    auth = build_auth(JWT_CONFIG, provider.issuer, jwks_url=None)
    provider.discovery["issuer"] = "https://impostor.example"
    token = provider.sign({**only_sub("eve"), **profile("eve")}, provider.rsa)
    with pytest.raises(BackendError) as caught:
        await auth.identify({"auth_token": token}, _no_client)
    assert "impostor" in caught.value.log_message
    assert not (await auth.health()).ok


async def test_discovery_with_the_provider_down_is_503(provider) -> None:
    auth = build_auth(JWT_CONFIG, provider.issuer, jwks_url=None)
    provider.fail_with = 503
    token = provider.sign({**only_sub("bob"), **profile("bob")}, provider.rsa)
    with pytest.raises(Unavailable):
        await auth.identify({"auth_token": token}, _no_client)


async def test_configured_urls_win_over_discovered_ones(provider) -> None:
    auth = build_auth(JWT_CONFIG, provider.issuer)  # jwks_url set in the config
    provider.discovery["jwks_uri"] = "http://127.0.0.1:9/nowhere"
    token = provider.sign({**only_sub("carol"), **profile("carol")}, provider.rsa)
    assert (await auth.identify({"auth_token": token}, _no_client)).username == "carol"


async def test_missing_profile_claims_come_from_userinfo(provider) -> None:
    auth = build_auth(JWT_CONFIG, provider.issuer)
    name = f"ui{secrets.token_hex(3)}"
    provider.profiles[stable_sub(name)] = profile(name)
    before = provider.hits.get("/userinfo", 0)
    info = await auth.identify({"auth_token": provider.sign(only_sub(name), provider.rsa)},
                               _no_client)
    assert (info.username, info.email, info.first_name) == (name, f"{name}@example.org", "Ada")
    assert provider.hits["/userinfo"] == before + 1
    # A token that has the claims is not looked up again.
    full = provider.sign({**only_sub(name), **profile(name)}, provider.rsa)
    await auth.identify({"auth_token": full}, _no_client)
    assert provider.hits["/userinfo"] == before + 1


async def test_the_tokens_own_claims_win_over_userinfo(provider) -> None:
    auth = build_auth(JWT_CONFIG, provider.issuer)
    name = f"ui{secrets.token_hex(3)}"
    provider.profiles[stable_sub(name)] = {**profile(name), "preferred_username": "root2"}
    token = provider.sign(only_sub(name, preferred_username=name), provider.rsa)
    assert (await auth.identify({"auth_token": token}, _no_client)).username == name


async def test_userinfo_about_another_subject_is_refused(provider) -> None:
    auth = build_auth(JWT_CONFIG, provider.issuer)
    name = f"ui{secrets.token_hex(3)}"
    provider.profiles[stable_sub(name)] = profile(name)
    provider.userinfo_sub = stable_sub("somebody-else")
    with pytest.raises(AuthenticationFailed) as caught:
        await auth.identify({"auth_token": provider.sign(only_sub(name), provider.rsa)},
                            _no_client)
    assert "userinfo sub" in caught.value.log_message


async def test_a_claim_missing_everywhere_is_named(provider) -> None:
    auth = build_auth(JWT_CONFIG, provider.issuer)
    name = f"ui{secrets.token_hex(3)}"
    provider.profiles[stable_sub(name)] = {"preferred_username": name,
                                           "groups": ["researchers"]}
    with pytest.raises(AuthenticationFailed) as caught:
        await auth.identify({"auth_token": provider.sign(only_sub(name), provider.rsa)},
                            _no_client)
    assert caught.value.user_message == MISSING_CLAIM.format(claim="email")
    assert "'email'" in caught.value.user_message


async def test_groups_from_userinfo_still_decide_admission(provider) -> None:
    auth = build_auth(JWT_CONFIG, provider.issuer)
    name = f"ui{secrets.token_hex(3)}"
    provider.profiles[stable_sub(name)] = {**profile(name), "groups": ["visitors"]}
    with pytest.raises(Forbidden) as caught:
        await auth.identify({"auth_token": provider.sign(only_sub(name), provider.rsa)},
                            _no_client)
    assert caught.value.user_message == NOT_IN_GROUP


async def test_userinfo_off_leaves_the_claim_missing(provider) -> None:
    auth = build_auth(JWT_CONFIG, provider.issuer, use_userinfo=False)
    name = f"ui{secrets.token_hex(3)}"
    provider.profiles[stable_sub(name)] = profile(name)
    with pytest.raises(AuthenticationFailed) as caught:
        await auth.identify({"auth_token": provider.sign(only_sub(name), provider.rsa)},
                            _no_client)
    assert caught.value.user_message == MISSING_CLAIM.format(claim="preferred_username")


async def test_missing_claim_reaches_the_client_named(jwt_client, provider) -> None:
    name = f"ui{secrets.token_hex(3)}"
    provider.profiles[stable_sub(name)] = {"preferred_username": name,
                                           "groups": ["researchers"]}
    r = await jwt_client.post("/tokens/", json={
        "auth_token": provider.sign(only_sub(name), provider.rsa)})
    assert r.status_code == 401
    assert r.json() == {"success": False, "message": MISSING_CLAIM.format(claim="email")}
