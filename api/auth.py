"""The ``UWS-Authorization: Token <key>`` scheme.

Authentication runs before every handler, public ones included, as the contract says: a
bad header is a 401 anywhere. Handlers that need a user declare the ``require_user`` guard.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.errors import NotAuthenticated
from api.tokens_cache import AuthUser
from db.tables import Token, User

HEADER = "uws-authorization"


async def lookup_token(key: str) -> AuthUser | None:
    row = await Token.select(Token.user.id, Token.user.username).where(
        (Token.key == key) & (Token.user.is_active.eq(True))
    ).first()
    if row is None:
        return None
    return AuthUser(id=row["user.id"], username=row["user.username"])


async def user_from_header(header: str | None, cache: Any) -> AuthUser | None:
    """Resolve a header value to a user; ``None`` when no header was sent."""
    if header is None:
        return None
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "token":
        raise NotAuthenticated("Invalid auth header format.")
    key = parts[1]
    user = cache.get(key)
    if user is None:
        user = await lookup_token(key)
        if user is None:
            raise NotAuthenticated("Invalid token provided.")
        cache.put(key, user)
    return user


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """App-wide guard, first of all guards: attach the caller (or ``None``). WebSockets
    authenticate inside their handler, after accepting, to close with 4401."""
    if connection.scope["type"] == "websocket":
        return
    connection.state.user = await user_from_header(
        connection.headers.get(HEADER), connection.app.state.uws.token_cache
    )


def require_user(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    if getattr(connection.state, "user", None) is None:
        raise NotAuthenticated("Authentication credentials were not provided.")


def current_user(request: Request[Any, Any, Any]) -> AuthUser:
    user = request.state.user
    assert user is not None, "route lacks the require_user guard"
    return user


__all__ = ["HEADER", "AuthUser", "User", "authenticate", "current_user", "require_user"]
