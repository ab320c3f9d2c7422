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
    body = f"t1.{job_id}.{user_id}.{int(now + ttl)}.{secrets.token_hex(12)}"
    return f"{body}.{_sign(key, body)}"


def read_ticket(key: bytes, value: str, *, job_id: int, now: float) -> Ticket | None:
    """The ticket if its signature, job and expiry hold (spending it is the caller's)."""
    parts = value.split(".")
    if len(parts) != 6 or parts[0] != "t1":
        return None
    body, signature = ".".join(parts[:5]), parts[5]
    if not hmac.compare_digest(_sign(key, body), signature):
        return None
    try:
        ticket = Ticket(int(parts[1]), int(parts[2]), int(parts[3]), parts[4])
    except ValueError:
        return None
    if ticket.job_id != job_id or ticket.expires < now:
        return None
    return ticket


def make_cookie(key: bytes, job_id: int, user_id: int, *, now: float, ttl: float) -> str:
    body = f"c1.{job_id}.{user_id}.{int(now + ttl)}"
    return f"{body}.{_sign(key, body)}"


def read_cookie(key: bytes, value: str, *, job_id: int, now: float) -> int | None:
    """The user id a valid cookie for ``job_id`` names, else ``None``."""
    parts = value.split(".")
    if len(parts) != 5 or parts[0] != "c1":
        return None
    body, signature = ".".join(parts[:4]), parts[4]
    if not hmac.compare_digest(_sign(key, body), signature):
        return None
    try:
        cookie_job, user_id, expires = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None
    if cookie_job != job_id or expires < now:
        return None
    return user_id
