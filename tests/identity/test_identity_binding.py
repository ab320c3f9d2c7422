"""Accounts are bound to the provider's (issuer, subject), never to its username alone.

A provider that lets users pick or reuse usernames (``preferred_username``) must not hand
anybody another person's account: a token of an unknown identity whose username is taken
is a 409 and no key, whichever of the three external methods checked it.
"""

from __future__ import annotations

import secrets
import uuid

from db.accounts import create_client, save_external_account, upsert_user
from db.tables import User
from tests.identity.conftest import (
    ALLOWED_GROUP,
    assert_taken,
    assert_works,
    identity_of,
    sign_in,
    stable_sub,
    user_row,
)
from tests.identity.test_globus import globus_token
from tests.identity.test_oidc_introspection import opaque
from tests.identity.test_oidc_jwt import claims


def jwt_for(provider, username: str, sub: str | None = None, **overrides) -> str:
    return provider.sign(claims(username, sub=sub or stable_sub(username), **overrides),
                         provider.rsa)


async def test_jwt_same_username_other_subject_is_409(jwt_client, provider) -> None:
    name = f"alice{secrets.token_hex(3)}"
    key = await assert_works(jwt_client, jwt_for(provider, name))
    assert await identity_of(name) == [{"issuer": provider.issuer, "subject": stable_sub(name)}]
    # Another person at the provider who chose the same preferred_username.
    await assert_taken(jwt_client, jwt_for(provider, name, sub="someone-else"), name)
    # The owner still signs in, with the same key.
    assert await assert_works(jwt_client, jwt_for(provider, name)) == key


async def test_jwt_renamed_identity_keeps_its_account(jwt_client, provider) -> None:
    name, renamed = f"bob{secrets.token_hex(3)}", f"robert{secrets.token_hex(3)}"
    sub = stable_sub(name)
    key = await assert_works(jwt_client, jwt_for(provider, name))
    # The provider now calls the same subject by another username: the same account (and
    # OS account), the username it was created with, the details kept current.
    token = jwt_for(provider, renamed, sub=sub, email="robert@example.org")
    assert await assert_works(jwt_client, token) == key
    assert await user_row(renamed) is None
    assert (await user_row(name))["email"] == "robert@example.org"


async def test_jwt_username_of_a_portal_user_is_409(jwt_client, provider) -> None:
    # A user that a portal vouched for (no identity, not created by this method).
    name = f"carol{secrets.token_hex(3)}"
    await upsert_user(_info(name))
    await assert_taken(jwt_client, jwt_for(provider, name), name)
    assert await identity_of(name) == []


async def test_api_client_names_are_reserved(jwt_client, provider) -> None:
    name = f"portal{secrets.token_hex(3)}"
    await create_client(name)
    r = await sign_in(jwt_client, jwt_for(provider, name))
    assert r.status_code == 403, r.text
    assert r.json() == {"success": False, "message": f"The username {name} is reserved."}


async def test_account_from_before_binding_is_bound_once(jwt_client, provider) -> None:
    # Made by this method before identities were recorded: its next sign-in binds it
    # (an upgrade locks nobody out), and from then on only that identity gets it.
    from controllers.base import ExternalAccount

    name = f"dave{secrets.token_hex(3)}"
    user_id = await upsert_user(_info(name))
    await save_external_account(user_id, "oidc", ExternalAccount(username=name))
    await assert_works(jwt_client, jwt_for(provider, name))
    assert await identity_of(name) == [{"issuer": provider.issuer, "subject": stable_sub(name)}]
    await assert_taken(jwt_client, jwt_for(provider, name, sub="late-comer"), name)


async def test_concurrent_first_sign_ins_make_one_account(jwt_client, provider) -> None:
    import asyncio

    name = f"erin{secrets.token_hex(3)}"
    answers = await asyncio.gather(*(sign_in(jwt_client, jwt_for(provider, name))
                                     for _ in range(4)))
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert len({r.json()["token"] for r in answers}) == 1
    assert await User.count().where(User.username == name) == 1


async def test_introspection_same_username_other_subject_is_409(introspection_client,
                                                               provider) -> None:
    name = f"frank{secrets.token_hex(3)}"
    await assert_works(introspection_client, opaque(provider, name))
    await assert_taken(introspection_client, opaque(provider, name, sub="impostor"), name)


async def test_introspection_token_without_sub_is_refused(introspection_client,
                                                          provider) -> None:
    r = await sign_in(introspection_client, opaque(provider, sub=None))
    assert r.status_code == 401, r.text


async def test_globus_binds_the_identity_id(globus_client, provider) -> None:
    # carol@uni.edu's first sign-in in this module may come from test_globus: either way
    # her account is bound to her identity id, and another identity id is not her.
    await assert_works(globus_client, globus_token(provider, "carol@uni.edu"))
    assert await identity_of("carol@uni.edu") == [
        {"issuer": "https://auth.globus.org", "subject": stable_sub("carol@uni.edu")}]
    other = str(uuid.uuid4())
    provider.groups.setdefault(ALLOWED_GROUP, {})[other] = "active"
    await assert_taken(globus_client, globus_token(provider, "carol@uni.edu", sub=other),
                       "carol@uni.edu")


def _info(name: str):
    from controllers.base import UserInfo

    return UserInfo(username=name, email=f"{name}@example.org")


async def test_portal_cannot_vouch_for_an_api_client(jwt_client) -> None:
    # The api_clients flow (no identity: the portal vouches) works as before, except that
    # an api client's own name is never handed to a user (its key vouches for anybody).
    import pytest

    from db.accounts import UsernameUnavailable, claim_identity

    portal, user = f"portal{secrets.token_hex(3)}", f"gina{secrets.token_hex(3)}"
    await create_client(portal)
    with pytest.raises(UsernameUnavailable) as caught:
        await claim_identity(_info(portal), "local_auth")
    assert caught.value.reserved
    assert await claim_identity(_info(user), "local_auth") == _info(user)
