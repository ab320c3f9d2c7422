"""``OIDCUserAuthentication`` in RFC 7662 introspection mode, through ``POST /tokens/``."""

from __future__ import annotations

import secrets

import pytest

from controllers.auth.oidc import MISSING_CLAIM, NOT_IN_GROUP
from controllers.errors import AuthenticationFailed
from tests.conftest import eventually
from tests.identity.conftest import (
    assert_forbidden,
    assert_refused,
    assert_works,
    build_auth,
    sign_in,
    stable_sub,
    user_row,
)

INTROSPECT = "/oauth2/introspect"
CONFIG = "identity-oidc-introspection.toml"


def opaque(provider, username: str | None = None, lifetime: float = 3600, **overrides) -> str:
    """An access token for our resource server, with the claim names the test config maps
    (``username``, ``first``, ``last``, ``memberOf``)."""
    username = username or f"rfc{secrets.token_hex(4)}"
    claims = {"iss": provider.issuer, "sub": stable_sub(username), "client_id": "portal",
              "aud": "uws-rs", "username": username, "email": f"{username}@example.org",
              "first": "Ada", "last": "Lovelace", "memberOf": ["staff", "researchers"],
              **overrides}
    return provider.issue(claims, lifetime=lifetime)


async def test_valid_token_and_claims_mapping(introspection_client, provider) -> None:
    name = f"ada{secrets.token_hex(3)}"
    key = await assert_works(introspection_client, opaque(provider, name))
    assert await user_row(name) == {"username": name, "email": f"{name}@example.org",
                                    "first_name": "Ada", "last_name": "Lovelace"}
    # A new access token of the same person: the same UWS key.
    assert await assert_works(introspection_client, opaque(provider, name)) == key


async def test_identity_is_cached_briefly_by_token(introspection_client, provider) -> None:
    token = opaque(provider)
    await assert_works(introspection_client, token)
    calls = provider.hits[INTROSPECT]
    await assert_works(introspection_client, token)
    assert provider.hits[INTROSPECT] == calls


async def test_cache_never_outlives_the_token(introspection_client, provider) -> None:
    # 3 s: exp is whole seconds (the fake truncates), so at least 2 s remain for the first
    # sign-in, which creates the OS account; 1.5 s left as little as 0.5 s on a busy machine.
    token = opaque(provider, lifetime=3)
    await assert_works(introspection_client, token)

    async def refused() -> bool:
        return (await sign_in(introspection_client, token)).status_code == 401

    # Refused once the token expired: well before the configured 60 s cache would end.
    await eventually(refused, timeout=10, interval=0.25)


async def test_inactive_tokens(introspection_client, provider) -> None:
    await assert_refused(introspection_client, secrets.token_urlsafe(24))
    revoked = opaque(provider)
    provider.revoke(revoked)
    await assert_refused(introspection_client, revoked)
    await assert_refused(introspection_client, opaque(provider, lifetime=-60))


async def test_wrong_audience_issuer_or_group(introspection_client, provider) -> None:
    await assert_refused(introspection_client,
                         opaque(provider, aud="another-api", client_id="another-portal"))
    await assert_refused(introspection_client, opaque(provider, iss="https://evil.example"))
    await assert_forbidden(introspection_client, opaque(provider, memberOf=["staff"]),
                           NOT_IN_GROUP)
    # No e-mail in the token, none from userinfo: a 401 that names the claim.
    r = await sign_in(introspection_client, opaque(provider, email=None))
    assert r.status_code == 401
    assert r.json()["message"] == MISSING_CLAIM.format(claim="email")


async def test_provider_down_issues_no_token(introspection_client, provider) -> None:
    token = opaque(provider)
    for status in (500, 503):
        provider.fail_with = status
        r = await sign_in(introspection_client, token)
        assert r.status_code == 503, r.text
        assert "token" not in r.json()
        assert r.json()["message"].startswith("The identity provider is unavailable")


async def test_provider_refusing_the_token_is_401(introspection_client, provider) -> None:
    # Some providers answer a token they do not know (here a JWT of another issuer) with a
    # 400 rather than active: false. That refuses the token, not our configuration.
    jwt_shaped = provider.sign({"aud": "uws-rs", "sub": "x"}, provider.rsa)
    for error in ("invalid_token", "unsupported_token_type", "invalid_request"):
        provider.unknown_token_answer = (400, {"error": error})
        await assert_refused(introspection_client, jwt_shaped)


async def test_provider_refusing_us_is_a_misconfiguration(introspection_client,
                                                          provider) -> None:
    token = opaque(provider)
    misconfigured = {"success": False,
                     "message": "Sign-in is misconfigured. Please contact an administrator."}
    provider.unknown_token_answer = (400, {"error": "invalid_client"})
    r = await sign_in(introspection_client, secrets.token_urlsafe(24))
    assert (r.status_code, r.json()) == (500, misconfigured)
    saved = provider.clients["uws-rs"]
    provider.clients["uws-rs"] = "rotated-secret"  # our secret no longer works: a 401
    try:
        r = await sign_in(introspection_client, token)
        assert (r.status_code, r.json()) == (500, misconfigured)
    finally:
        provider.clients["uws-rs"] = saved


async def test_audience_is_aud_not_client_id(introspection_client, provider) -> None:
    # Issued to our client id for another API: not for us.
    await assert_refused(introspection_client,
                         opaque(provider, aud="another-api", client_id="uws-rs"))
    await assert_refused(introspection_client, opaque(provider, aud=None, client_id="uws-rs"))
    await assert_works(introspection_client, opaque(provider, aud=["another-api", "uws-rs"]))


async def test_client_id_as_audience_when_configured(provider) -> None:
    token = opaque(provider, "hank", aud=None, client_id="uws-rs")
    strict = build_auth(CONFIG, provider.issuer)
    with pytest.raises(AuthenticationFailed):
        await strict.identify({"auth_token": token}, _no_client)
    lenient = build_auth(CONFIG, provider.issuer, accept_client_id_as_audience=True)
    info = await lenient.identify({"auth_token": token}, _no_client)
    assert (info.username, info.issuer, info.subject) == ("hank", provider.issuer,
                                                          stable_sub("hank"))


async def _no_client(_: str) -> bool:
    return False
