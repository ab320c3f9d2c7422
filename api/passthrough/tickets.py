"""Signed credentials for the passthrough: a short-lived, single-use ticket in the URL the
owner opens, exchanged for an HttpOnly cookie scoped to that job's path.

A browser navigating to the session cannot send our ``UWS-Authorization`` header, so the
owner's copy of the job's URL carries a ticket; the passthrough spends it (once: a leaked
link is useless after the owner opened it) and sets the cookie. Both are HMAC-SHA256 over
the job id, the user id and an expiry, with the server's secret key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

TICKET_PARAM = "uws_ticket"


def cookie_name(job_id: int) -> str:
    return f"uws_session_{job_id}"


def _sign(key: bytes, body: str) -> str:
    digest = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True)
class Ticket:
    job_id: int
    user_id: int
    expires: int
    nonce: str


def make_ticket(key: bytes, job_id: int, user_id: int, *, now: float, ttl: float) -> str:
    return _signed(key, "t1", job_id, user_id, int(now + ttl), secrets.token_hex(12))


def read_ticket(key: bytes, value: str, *, job_id: int, now: float) -> Ticket | None:
    """The ticket if its signature, job and expiry hold (spending it is the caller's)."""
    fields = _signed_fields(key, value, "t1", 4)
    try:
        ticket = Ticket(int(fields[0]), int(fields[1]), int(fields[2]), fields[3]) \
            if fields else None
    except ValueError:
        return None
    if ticket is None or ticket.job_id != job_id or ticket.expires < now:
        return None
    return ticket


def make_cookie(key: bytes, job_id: int, user_id: int, *, now: float, ttl: float) -> str:
    return _signed(key, "c1", job_id, user_id, int(now + ttl))


def read_cookie(key: bytes, value: str, *, job_id: int, now: float) -> int | None:
    """The user id a valid cookie for ``job_id`` names, else ``None``."""
    fields = _signed_fields(key, value, "c1", 3)
    try:
        cookie_job, user_id, expires = (int(f) for f in fields) if fields else (0, 0, 0)
    except ValueError:
        return None
    if not fields or cookie_job != job_id or expires < now:
        return None
    return user_id


def _signed(key: bytes, version: str, *fields: object) -> str:
    """``version.f1...fN.signature``: the fields, and our signature of them."""
    body = ".".join([version, *map(str, fields)])
    return f"{body}.{_sign(key, body)}"


def _signed_fields(key: bytes, value: str, version: str, count: int) -> list[str] | None:
    """The ``count`` fields of ``version.f1...fN.signature`` when the signature is ours."""
    parts = value.split(".")
    if len(parts) != count + 2 or parts[0] != version:
        return None
    body, signature = ".".join(parts[:-1]), parts[-1]
    if not hmac.compare_digest(_sign(key, body), signature):
        return None
    return parts[1:-1]
