"""Users and what stands for them: groups, API keys, external accounts, the web page's
login tickets and sessions, and the session links' spent tickets.

A sign-in method backed by an identity provider names the identity by (issuer, subject);
the user it belongs to is found by that pair, kept under ``"identity"`` in the
external-user mapping's details (unique per sign-in method, migration
``2026-12-11T09:00:00``). The provider's username only names a new account, and only when
no other account has it: a provider may let its users pick or reuse usernames, and the
username alone would hand them somebody else's account.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import timedelta
from typing import Any

from core.values import AccountSource, ExternalAccount, UserInfo
from db import sql

API_CLIENTS_GROUP = "api_clients"
IDENTITY = "identity"
# First sign-ins of identities take this transaction-level advisory lock, so the check that
# a username is free and its claim cannot interleave with another's.
_SIGN_IN_LOCK = 0x75777369676E  # "uwsign"


class UsernameUnavailable(Exception):
    """A sign-in names a username that another account holds, or an api client's."""

    def __init__(self, username: str, *, reserved: bool) -> None:
        self.reserved = reserved
        self.message = (
            f"The username {username} is reserved." if reserved else
            f"The username {username} is already used by another account. Sign in with the "
            "identity that created it, or ask an administrator to link or rename it.")
        super().__init__(self.message)


def new_key() -> str:
    return secrets.token_hex(20)


async def is_api_client(key: str) -> bool:
    return bool(await sql.fetchval(
        'SELECT EXISTS (SELECT 1 FROM uws_token t JOIN uws_user u ON u.id = t."user" '
        'JOIN uws_group_membership g ON g."user" = u.id '
        "WHERE t.key = $1 AND u.is_active AND g.group_name = $2)", key, API_CLIENTS_GROUP))


async def token_user(key: str) -> tuple[int, str] | None:
    """(id, username) of the active user whose API key this is (every request asks)."""
    row = await sql.fetchrow(
        'SELECT u.id, u.username FROM uws_token t JOIN uws_user u ON u.id = t."user" '
        "WHERE t.key = $1 AND u.is_active", key)
    return (row["id"], row["username"]) if row else None


async def upsert_user(info: UserInfo) -> int:
    """The user with this username, created on first sight; details kept current."""
    user_id = await sql.fetch_int(
        "INSERT INTO uws_user (username, email, first_name, last_name, is_active, date_joined) "
        "VALUES ($1, $2, $3, $4, true, now()) "
        "ON CONFLICT (username) DO UPDATE SET email = EXCLUDED.email, "
        "first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name "
        "RETURNING id",
        info.username, info.email, info.first_name, info.last_name,
    )
    assert user_id is not None
    return user_id


async def token_for(user_id: int) -> str:
    """The user's key, created once: the same user always gets the same key."""
    await sql.execute(
        'INSERT INTO uws_token (key, "user", created) VALUES ($1, $2, now()) '
        'ON CONFLICT ("user") DO NOTHING', new_key(), user_id)
    key = await sql.fetch_str('SELECT key FROM uws_token WHERE "user" = $1', user_id)
    assert key is not None
    return key


async def add_to_group(user_id: int, group: str) -> None:
    await sql.execute(
        'INSERT INTO uws_group_membership ("user", group_name) SELECT $1::bigint, $2::varchar '
        'WHERE NOT EXISTS (SELECT 1 FROM uws_group_membership WHERE "user" = $1 '
        "AND group_name = $2::varchar)", user_id, group)


async def save_external_account(user_id: int, auth_name: str, account: ExternalAccount,
                                conn: Any = None) -> None:
    """Record the user's account under ``auth_name``, keeping the identity bound to it."""
    if conn is None:
        async with sql.transaction() as tx:
            await _save_mapping(tx, user_id, auth_name, account, None)
    else:
        await _save_mapping(conn, user_id, auth_name, account, None)


async def _save_mapping(conn: Any, user_id: int, auth_name: str, account: ExternalAccount,
                        identity: tuple[str, str] | None) -> None:
    """The mapping row of (user, auth_name): ``identity`` (issuer, subject) stored with the
    account when given, else the one already stored kept."""
    details: dict[str, Any] = account.model_dump()
    if identity is not None:
        details[IDENTITY] = {"issuer": identity[0], "subject": identity[1]}
    args = (user_id, auth_name, account.username, str(account.uid or ""), json.dumps(details))
    updated = await conn.fetchval(
        "UPDATE uws_external_user_mapping SET external_username = $3, external_user_id = $4, "
        "external_user_details = $5::jsonb || jsonb_strip_nulls(jsonb_build_object("
        "'identity', CASE WHEN $5::jsonb ? 'identity' THEN NULL "
        "ELSE external_user_details->'identity' END)) "
        'WHERE "user" = $1 AND user_authentication_name = $2 RETURNING id', *args)
    if updated is None:
        await conn.execute(
            "INSERT INTO uws_external_user_mapping (\"user\", user_authentication_name, "
            "external_username, external_user_id, external_user_details) "
            "VALUES ($1, $2, $3, $4, $5::jsonb)", *args)


_BOUND = (
    'SELECT u.id, u.username FROM uws_external_user_mapping m JOIN uws_user u ON u.id = m."user" '
    "WHERE (m.external_user_details->'identity') IS NOT NULL "
    "AND m.external_user_details->'identity'->>'issuer' = $1 "
    "AND m.external_user_details->'identity'->>'subject' = $2 LIMIT 1"
)
_HOLDER = (
    "SELECT u.id, "
    'EXISTS (SELECT 1 FROM uws_group_membership g WHERE g."user" = u.id '
    "AND g.group_name = $3) AS api_client, "
    'EXISTS (SELECT 1 FROM uws_external_user_mapping m WHERE m."user" = u.id '
    "AND (m.external_user_details->'identity') IS NOT NULL) AS bound, "
    'EXISTS (SELECT 1 FROM uws_external_user_mapping m WHERE m."user" = u.id '
    "AND m.user_authentication_name = $2) AS mapped_here "
    "FROM uws_user u WHERE u.username = $1"
)


async def _holder_of(conn: Any, username: str, auth_name: str) -> int | None:
    """The user that may take ``username`` for a new identity of ``auth_name``: ``None``
    when nobody holds it; raises ``UsernameUnavailable`` when another account does."""
    row = await conn.fetchrow(_HOLDER, username, auth_name, API_CLIENTS_GROUP)
    if row is None:
        return None
    if row["api_client"]:
        raise UsernameUnavailable(username, reserved=True)
    # An account this method made before identities were recorded (no identity anywhere)
    # is taken over by its next sign-in, once: else every existing user would be locked
    # out by the upgrade. Anything else (a portal's user, another identity's) is not.
    if row["bound"] or not row["mapped_here"]:
        raise UsernameUnavailable(username, reserved=False)
    return int(row["id"])


async def claim_identity(info: UserInfo, auth_name: str) -> UserInfo:
    """Check a sign-in before its account is made: ``info`` with the username of the user
    its identity is bound to, else with its own username when that may be taken. Raises
    ``UsernameUnavailable`` (an api client's name; another account's)."""
    async with sql.transaction() as conn:
        if info.issuer is None or info.subject is None:
            # A trusted client vouches for the username; an api client's is never handed out.
            row = await conn.fetchrow(_HOLDER, info.username, auth_name, API_CLIENTS_GROUP)
            if row is not None and row["api_client"]:
                raise UsernameUnavailable(info.username, reserved=True)
            return info
        bound = await conn.fetchrow(_BOUND, info.issuer, info.subject)
        if bound is None:
            try:
                await _holder_of(conn, info.username, auth_name)
                return info
            except UsernameUnavailable:
                # Each statement sees what was committed before it: a concurrent first
                # sign-in of this identity may have bound the username in between.
                bound = await conn.fetchrow(_BOUND, info.issuer, info.subject)
                if bound is None:
                    raise
        return info.model_copy(update={"username": bound["username"]})


async def sign_in_user(info: UserInfo, auth_name: str, account: ExternalAccount) -> int:
    """The user ``info`` (from ``claim_identity``) signs in as, created or bound now, with
    ``account`` recorded as theirs under ``auth_name``."""
    if info.issuer is None or info.subject is None:
        vouched = await upsert_user(info)
        await save_external_account(vouched, auth_name, account)
        return vouched
    identity = (info.issuer, info.subject)
    async with sql.transaction() as conn:
        bound = await conn.fetchrow(_BOUND, *identity)
        if bound is None:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SIGN_IN_LOCK)
            bound = await conn.fetchrow(_BOUND, *identity)  # a concurrent first sign-in
        user_id: int | None
        if bound is not None:
            user_id = int(bound["id"])
        else:
            user_id = await _holder_of(conn, info.username, auth_name)
            if user_id is None:
                # ON CONFLICT: a portal's user of that name created since (not under our lock).
                created = await conn.fetchval(
                    "INSERT INTO uws_user (username, email, first_name, last_name, "
                    "is_active, date_joined) VALUES ($1, '', '', '', true, now()) "
                    "ON CONFLICT (username) DO NOTHING RETURNING id", info.username)
                if created is None:
                    raise UsernameUnavailable(info.username, reserved=False)
                user_id = int(created)
        await conn.execute(
            "UPDATE uws_user SET email = $2, first_name = $3, last_name = $4 WHERE id = $1",
            user_id, info.email, info.first_name, info.last_name)
        await _save_mapping(conn, user_id, auth_name, account, identity)
    return user_id


async def external_account(user_id: int, auth_name: str) -> ExternalAccount | None:
    details = await sql.fetchval(
        "SELECT external_user_details FROM uws_external_user_mapping "
        'WHERE "user" = $1 AND user_authentication_name = $2 LIMIT 1', user_id, auth_name)
    if details is None:
        return None
    return ExternalAccount.model_validate(sql.as_json(details))


async def user_info(user_id: int) -> UserInfo | None:
    row = await sql.fetchrow(
        "SELECT username, email, first_name, last_name FROM uws_user WHERE id = $1", user_id)
    return UserInfo(**dict(row)) if row else None


async def user_id_named(username: str) -> int | None:
    return await sql.fetch_int("SELECT id FROM uws_user WHERE username = $1", username)


async def create_client(name: str) -> str:
    """An api_clients member named ``name`` and its key (``uws create-client-token``)."""
    await sql.execute(
        "INSERT INTO uws_user (username, email, first_name, last_name, is_active, date_joined) "
        "VALUES ($1, '', '', '', true, now()) ON CONFLICT (username) DO NOTHING", name)
    user_id = await user_id_named(name)
    assert user_id is not None
    await add_to_group(user_id, API_CLIENTS_GROUP)
    return await token_for(user_id)


async def claim_personal_owner(username: str) -> str:
    """The personal server's owner: ``username`` if nobody signed in before (one atomic
    insert, so two first sign-ins cannot both win), else whoever did."""
    await sql.execute(
        "INSERT INTO uws_personal_owner (id, username) VALUES (1, $1) "
        "ON CONFLICT (id) DO NOTHING", username)
    owner = await sql.fetch_str("SELECT username FROM uws_personal_owner WHERE id = 1")
    assert owner is not None
    return owner


async def search(exclude_user_id: int, text: str, limit: int = 500) -> list[dict[str, Any]]:
    """Active users (never ``exclude_user_id`` nor ``admin``) whose first and last name, or
    e-mail, contain ``text`` in any case; all of them for an empty ``text``."""
    clauses = ["id <> $1", "username <> 'admin'", "is_active"]
    args: list[Any] = [exclude_user_id]
    if text:
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args.append(f"%{escaped}%")
        clauses.append(f"((first_name || ' ' || last_name) ILIKE ${len(args)} "
                       f"OR email ILIKE ${len(args)})")
    args.append(limit)
    rows = await sql.fetch(
        "SELECT id, first_name, last_name, username, email FROM uws_user "
        f"WHERE {' AND '.join(clauses)} ORDER BY id LIMIT ${len(args)}", *args)
    return [dict(row) for row in rows]


class UnknownUser(LookupError):
    pass


async def account_of(user_id: int, auth: AccountSource) -> ExternalAccount:
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


# --- the web page's credentials ----------------------------------------------------------
# A key is random (32 bytes, URL-safe) and shown once; the table holds its SHA-256. Spending
# a ticket deletes its row in the statement that reads it, so two requests with one ticket
# cannot both sign in. Expired rows are removed whenever a new credential is made.

LOGIN_TICKET = "ticket"
BROWSER_SESSION = "session"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def _issue(kind: str, user_id: int, ttl: timedelta) -> str:
    await sql.execute("DELETE FROM uws_browser_credential WHERE expires < now()")
    key = secrets.token_urlsafe(32)
    await sql.execute(
        'INSERT INTO uws_browser_credential (kind, key_hash, "user", expires) '
        "VALUES ($1, $2, $3, now() + $4::interval)", kind, _hash(key), user_id, ttl)
    return key


async def issue_login_ticket(user_id: int, ttl: timedelta) -> str:
    return await _issue(LOGIN_TICKET, user_id, ttl)


async def issue_browser_session(user_id: int, ttl: timedelta) -> str:
    return await _issue(BROWSER_SESSION, user_id, ttl)


async def spend_login_ticket(key: str) -> int | None:
    """The user a valid ticket names, once; ``None`` for an unknown, spent or expired one."""
    if not key or len(key) > 128:
        return None
    return await sql.fetch_int(
        "DELETE FROM uws_browser_credential WHERE key_hash = $1 AND kind = $2 "
        'AND expires > now() RETURNING "user"', _hash(key), LOGIN_TICKET)


async def browser_session_user(key: str) -> tuple[int, str] | None:
    """(id, username) of an active user's live session."""
    if not key or len(key) > 128:
        return None
    row = await sql.fetchrow(
        "SELECT u.id, u.username FROM uws_browser_credential c "
        'JOIN uws_user u ON u.id = c."user" '
        "WHERE c.key_hash = $1 AND c.kind = $2 AND c.expires > now() AND u.is_active",
        _hash(key), BROWSER_SESSION)
    return (row["id"], row["username"]) if row else None


async def end_browser_session(key: str) -> None:
    await sql.execute("DELETE FROM uws_browser_credential WHERE key_hash = $1 AND kind = $2",
                      _hash(key), BROWSER_SESSION)


# --- session links ---------------------------------------------------------------------


async def spend_link_ticket(nonce: str, ttl_seconds: float) -> bool:
    """Record a session link's ticket as used; ``False`` if it was used before (a ticket
    works once)."""
    spent = await sql.fetchval(
        "INSERT INTO uws_spent_ticket (nonce, expires) VALUES ($1, now() + $2::interval) "
        "ON CONFLICT (nonce) DO NOTHING RETURNING id", nonce, timedelta(seconds=ttl_seconds))
    return spent is not None
