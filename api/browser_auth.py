"""The web page's credential: an HttpOnly session cookie, with CSRF protection.

The page (``/ui/``) is a client of the public API like any other, but a browser cannot
keep a key away from scripts in a header; it keeps an HttpOnly cookie instead. A request
authenticated by that cookie alone must prove it comes from our page: every state-changing
one carries ``X-UWS-CSRF``, an HMAC of the session key that only a page we rendered knows
(a cross-site form or fetch cannot read it), and a WebSocket must come from our own origin
(browsers send cookies on cross-site WebSockets, and the Origin header is theirs to set).
The ``UWS-Authorization`` header, when present, wins and needs neither.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlsplit

from api.errors import PermissionDenied
from api.principal import AuthUser
from db import accounts

COOKIE = "uws_browser"
CSRF_HEADER = "x-uws-csrf"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
PASSTHROUGH_PREFIX = b"/passthrough/"
CSRF_REFUSED = "CSRF token missing or incorrect."


def csrf_token(secret_key: bytes, session_key: str) -> str:
    digest = hmac.new(secret_key, b"uws-csrf:" + session_key.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def cookie_value(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Our session cookie from raw ASGI headers, ``None`` when absent."""
    for name, value in headers:
        if name == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # a malformed Cookie header is no credential
                continue
            if COOKIE in jar:
                return jar[COOKIE].value
    return None


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in headers if k == name), None)


def same_origin(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request's Origin names the host it was sent to (a page of ours opened it)."""
    origin, host = _header(headers, b"origin"), _header(headers, b"host")
    if not origin or not host:
        return False
    return urlsplit(origin).netloc.lower() == host.lower()


async def cookie_user(scope: dict[str, Any], secret_key: bytes) -> AuthUser | None:
    """The user of the request's session cookie (``None``: no cookie). A stale cookie is
    no user (the page sends its owner to sign in again); a state-changing request, or a
    WebSocket, that does not prove it comes from our page is refused."""
    # A session's traffic has its own ticket cookie, never this one. (The passthrough is a
    # mount: by the time middleware runs, ``path`` may be the mount's remainder.)
    if (scope.get("raw_path") or scope["path"].encode()).startswith(PASSTHROUGH_PREFIX):
        return None
    headers = scope["headers"]
    key = cookie_value(headers)
    if key is None:
        return None
    found = await accounts.browser_session_user(key)
    if found is None:
        return None
    if scope["type"] == "websocket":
        if not same_origin(headers):
            return None
    elif scope["method"] not in SAFE_METHODS:
        sent = _header(headers, CSRF_HEADER.encode()) or ""
        if not hmac.compare_digest(sent.encode(), csrf_token(secret_key, key).encode()):
            raise PermissionDenied(CSRF_REFUSED)
    return AuthUser(id=found[0], username=found[1])
