"""The web page's credentials: one-time login tickets and the sessions they become.

A key is random (32 bytes, URL-safe) and shown once; the table holds its SHA-256. Spending a
ticket deletes its row in the statement that reads it, so two requests with one ticket
cannot both sign in. Expired rows are removed whenever a new credential is made.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from db.tables import BrowserCredential, User

TICKET = "ticket"
SESSION = "session"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def _issue(kind: str, user_id: int, ttl: timedelta) -> str:
    now = datetime.now(UTC)
    await BrowserCredential.delete().where(BrowserCredential.expires < now)
    key = secrets.token_urlsafe(32)
    await BrowserCredential.insert(BrowserCredential(
        kind=kind, key_hash=_hash(key), user=user_id, expires=now + ttl))
    return key


async def issue_ticket(user_id: int, ttl: timedelta) -> str:
    return await _issue(TICKET, user_id, ttl)


async def issue_session(user_id: int, ttl: timedelta) -> str:
    return await _issue(SESSION, user_id, ttl)


async def spend_ticket(key: str) -> int | None:
    """The user a valid ticket names, once; ``None`` for an unknown, spent or expired one."""
    if not key or len(key) > 128:
        return None
    rows = await BrowserCredential.raw(
        "DELETE FROM uws_browser_credential WHERE key_hash = {} AND kind = {} "
        'AND expires > now() RETURNING "user"', _hash(key), TICKET)
    return rows[0]["user"] if rows else None


async def session_user(key: str) -> tuple[int, str] | None:
    """(id, username) of an active user's live session."""
    if not key or len(key) > 128:
        return None
    rows = await BrowserCredential.raw(
        "SELECT u.id, u.username FROM uws_browser_credential c "
        'JOIN uws_user u ON u.id = c."user" '
        "WHERE c.key_hash = {} AND c.kind = {} AND c.expires > now() AND u.is_active",
        _hash(key), SESSION)
    return (rows[0]["id"], rows[0]["username"]) if rows else None


async def end_session(key: str) -> None:
    await BrowserCredential.delete().where(
        (BrowserCredential.key_hash == _hash(key)) & (BrowserCredential.kind == SESSION))


async def user_id_named(username: str) -> int | None:
    row = await User.select(User.id).where(User.username == username).first()
    return row["id"] if row else None
