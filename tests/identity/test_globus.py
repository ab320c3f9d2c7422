"""``GlobusUserAuthentication`` through ``POST /tokens/`` against a Globus-shaped provider."""

from __future__ import annotations

import pwd
import secrets
import uuid

from controllers.auth.globus import NOT_IN_GROUPS
from db.accounts import external_account
from db.tables import User
from tests.identity.conftest import (
    ALLOWED_GROUP,
    GLOBUS_CLIENT,
    MAPPED_OS_USER,
    assert_forbidden,
    assert_refused,
    assert_works,
    sign_in,
    stable_sub,
    user_row,
)


def globus_token(provider, username: str = "alice@globusid.org", *, member: str = "active",
                 lifetime: float = 3600, sub: str | None = None, **overrides) -> str:
    """A Groups token as Globus issues it to our portal client, its identity (``sub``: the
    same for every token of one username unless given) linked to a second identity that
    holds the group membership."""
    sub, linked = sub or stable_sub(username), str(uuid.uuid4())
    provider.groups.setdefault(ALLOWED_GROUP, {})[linked] = member
    claims = {
        "sub": sub, "username": username, "email": username.replace("@globusid.org",
                                                                    "@example.org"),
        "name": "Alice van Example", "client_id": GLOBUS_CLIENT,
        "aud": ["groups.api.globus.org", GLOBUS_CLIENT],
        "scope": "urn:globus:auth:scope:groups.api.globus.org:all",
        "identity_set": [sub, linked], **overrides,
    }
    return provider.issue(claims, lifetime=lifetime)


async def test_valid_token_signs_in_and_maps_identity(globus_client, provider) -> None:
    key = await assert_works(globus_client, globus_token(provider))
    # Another Globus token of the same person: the same UWS key, as the local flow does.
    assert await assert_works(globus_client, globus_token(provider)) == key
    row = await user_row("alice@globusid.org")
    assert row == {"username": "alice@globusid.org", "email": "alice@example.org",
                   "first_name": "Alice", "last_name": "van Example"}
    # account_map sent this identity to the OS account it names.
    user = await User.select(User.id).where(User.username == "alice@globusid.org").first()
    account = await external_account(user["id"], "globus")
    entry = pwd.getpwnam(MAPPED_OS_USER)
    assert account is not None
    assert (account.username, account.uid, account.gid) == (
        MAPPED_OS_USER, entry.pw_uid, entry.pw_gid)


async def test_introspection_asks_for_identity_set_with_client_credentials(
        globus_client, provider) -> None:
    # The membership is held by the linked identity only: it is found only if the
    # introspection asked for identity_set (and authenticated as our client to get it).
    before = provider.hits.get("/v2/oauth2/token/introspect", 0)
    await assert_works(globus_client, globus_token(provider, "carol@uni.edu"))
    assert provider.hits["/v2/oauth2/token/introspect"] == before + 1


async def test_missing_auth_token(globus_client) -> None:
    for body in ({}, {"auth_token": ""}, {"client_token": "x"}):
        r = await globus_client.post("/tokens/", json=body)
        assert r.status_code == 400, body
        assert r.json() == {"success": False, "message": "Missing auth_token."}


async def test_unknown_revoked_and_expired_tokens(globus_client, provider) -> None:
    await assert_refused(globus_client, secrets.token_urlsafe(32))
    revoked = globus_token(provider)
    provider.revoke(revoked)
    await assert_refused(globus_client, revoked)
    await assert_refused(globus_client, globus_token(provider, lifetime=-10))


async def test_token_for_another_client(globus_client, provider) -> None:
    token = globus_token(provider, client_id="someone-elses-portal",
                         aud=["groups.api.globus.org", "someone-elses-portal"])
    await assert_refused(globus_client, token)


async def test_not_an_active_group_member(globus_client, provider) -> None:
    await assert_forbidden(globus_client, globus_token(provider, member="invited"), NOT_IN_GROUPS)
    # In no group at all.
    token = provider.issue({"sub": str(uuid.uuid4()), "username": "alice@globusid.org",
                            "email": "alice@example.org", "client_id": GLOBUS_CLIENT,
                            "aud": [GLOBUS_CLIENT]})
    await assert_forbidden(globus_client, token, NOT_IN_GROUPS)


async def test_identity_without_os_account_mapping(globus_client, provider) -> None:
    await assert_refused(globus_client, globus_token(provider, "mallory@globusid.org"))
    assert await user_row("mallory@globusid.org") is None


async def test_provider_down_issues_no_token(globus_client, provider) -> None:
    token = globus_token(provider, "carol@uni.edu")
    provider.fail_with = 503
    r = await sign_in(globus_client, token)
    assert r.status_code == 503
    assert r.json() == {"success": False, "message": "The identity provider is unavailable "
                                                     "right now. Please try again shortly."}
    provider.fail_with = None
    await assert_works(globus_client, token)


async def test_client_id_alone_is_no_audience(globus_client, provider) -> None:
    # Issued to our client for another resource server: its aud does not name us.
    await assert_refused(globus_client, globus_token(provider, aud=["transfer.api.globus.org"]))
