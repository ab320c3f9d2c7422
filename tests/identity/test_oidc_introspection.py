"""``OIDCUserAuthentication`` in RFC 7662 introspection mode, through ``POST /tokens/``."""

from __future__ import annotations

import secrets

from controllers.auth.oidc import NOT_IN_GROUP
from tests.conftest import eventually
from tests.identity.conftest import (
    assert_forbidden,
    assert_refused,
    assert_works,
    sign_in,
    user_row,
)

INTROSPECT = "/oauth2/introspect"


def opaque(provider, username: str | None = None, lifetime: float = 3600, **overrides) -> str:
    """An access token for our resource server, with the claim names the test config maps
    (``username``, ``first``, ``last``, ``memberOf``)."""
    username = username or f"rfc{secrets.token_hex(4)}"
    claims = {"iss": provider.issuer, "sub": secrets.token_hex(8), "client_id": "portal",
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
    token = opaque(provider, lifetime=1.5)
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
    await assert_refused(introspection_client, opaque(provider, email=None))


async def test_provider_down_issues_no_token(introspection_client, provider) -> None:
    token = opaque(provider)
    for status in (500, 503):
        provider.fail_with = status
        r = await sign_in(introspection_client, token)
        assert r.status_code == 503, r.text
        assert "token" not in r.json()
        assert r.json()["message"].startswith("The identity provider is unavailable")
