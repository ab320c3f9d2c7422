"""Users, groups, tokens and external accounts."""

from __future__ import annotations

import secrets

from controllers.base import AuthMethod, ExternalAccount, UserInfo
from db.queries import as_json
from db.tables import ExternalUserMapping, GroupMembership, PersonalOwner, Token, User

API_CLIENTS_GROUP = "api_clients"


def new_key() -> str:
    return secrets.token_hex(20)


async def is_api_client(key: str) -> bool:
    row = await Token.select(Token.user.id).where(
        (Token.key == key) & Token.user.is_active.eq(True)
    ).first()
    if row is None:
        return False
    return await GroupMembership.exists().where(
        (GroupMembership.user == row["user.id"])
        & (GroupMembership.group_name == API_CLIENTS_GROUP)
    )


async def upsert_user(info: UserInfo) -> int:
    """The user with this username, created on first sight; details kept current."""
    rows = await User.raw(
        "INSERT INTO uws_user (username, email, first_name, last_name, is_active, date_joined) "
        "VALUES ({}, {}, {}, {}, true, now()) "
        "ON CONFLICT (username) DO UPDATE SET email = EXCLUDED.email, "
        "first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name "
        "RETURNING id",
        info.username, info.email, info.first_name, info.last_name,
    )
    return rows[0]["id"]


async def token_for(user_id: int) -> str:
    """The user's key, created once: the same user always gets the same key."""
    await Token.raw(
        'INSERT INTO uws_token (key, "user", created) VALUES ({}, {}, now()) '
        'ON CONFLICT ("user") DO NOTHING',
        new_key(), user_id,
    )
    row = await Token.select(Token.key).where(Token.user == user_id).first()
    assert row is not None
    return row["key"]


async def add_to_group(user_id: int, group: str) -> None:
    exists = await GroupMembership.exists().where(
        (GroupMembership.user == user_id) & (GroupMembership.group_name == group)
    )
    if not exists:
        await GroupMembership.insert(GroupMembership(user=user_id, group_name=group))


async def save_external_account(user_id: int, auth_name: str, account: ExternalAccount) -> None:
    details = account.model_dump()
    updated = await ExternalUserMapping.update(
        {
            ExternalUserMapping.external_username: account.username,
            ExternalUserMapping.external_user_id: str(account.uid or ""),
            ExternalUserMapping.external_user_details: details,
        }
    ).where(
        (ExternalUserMapping.user == user_id)
        & (ExternalUserMapping.user_authentication_name == auth_name)
    ).returning(ExternalUserMapping.id)
    if not updated:
        await ExternalUserMapping.insert(
            ExternalUserMapping(
                user=user_id, user_authentication_name=auth_name,
                external_username=account.username, external_user_id=str(account.uid or ""),
                external_user_details=details,
            )
        )


async def external_account(user_id: int, auth_name: str) -> ExternalAccount | None:
    row = await ExternalUserMapping.select(ExternalUserMapping.external_user_details).where(
        (ExternalUserMapping.user == user_id)
        & (ExternalUserMapping.user_authentication_name == auth_name)
    ).first()
    if row is None:
        return None
    return ExternalAccount.model_validate(as_json(row["external_user_details"]))


async def user_info(user_id: int) -> UserInfo | None:
    row = await User.select(
        User.username, User.email, User.first_name, User.last_name
    ).where(User.id == user_id).first()
    return UserInfo(**row) if row else None


async def create_client(name: str) -> str:
    """An api_clients member named ``name`` and its key (``uws create-client-token``)."""
    await User.raw(
        "INSERT INTO uws_user (username, email, first_name, last_name, is_active, date_joined) "
        "VALUES ({}, '', '', '', true, now()) ON CONFLICT (username) DO NOTHING",
        name,
    )
    row = await User.select(User.id).where(User.username == name).first()
    assert row is not None
    user_id = row["id"]
    await add_to_group(user_id, API_CLIENTS_GROUP)
    return await token_for(user_id)


async def claim_personal_owner(username: str) -> str:
    """The personal server's owner: ``username`` if nobody signed in before (one atomic
    insert, so two first sign-ins cannot both win), else whoever did."""
    await PersonalOwner.raw(
        "INSERT INTO uws_personal_owner (id, username) VALUES (1, {}) "
        "ON CONFLICT (id) DO NOTHING", username,
    )
    row = await PersonalOwner.select(PersonalOwner.username).where(PersonalOwner.id == 1).first()
    assert row is not None
    return row["username"]


class UnknownUser(LookupError):
    pass


async def account_of(user_id: int, auth: AuthMethod) -> ExternalAccount:
    """The user's account under ``auth``: the recorded mapping, else found (or created)
    by the auth method now and recorded."""
    account = await external_account(user_id, auth.name)
    if account is None:
        info = await user_info(user_id)
        if info is None:
            raise UnknownUser(f"user {user_id} does not exist")
        account = await auth.ensure_external_account(info)
        await save_external_account(user_id, auth.name, account)
    return account
