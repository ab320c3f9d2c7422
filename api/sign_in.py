"""Admitting an identity the sign-in method vouched for: the one sequence ``POST /tokens/``
and the web page's provider sign-in share, so both map identities to accounts alike."""

from __future__ import annotations

from litestar.status_codes import HTTP_403_FORBIDDEN, HTTP_409_CONFLICT

from api.errors import ApiError
from controllers.base import AuthMethod, UserInfo
from controllers.errors import Forbidden
from db import accounts


async def admit(auth: AuthMethod, info: UserInfo) -> int:
    """The user id for ``info``, its account and external account created when new.
    Raises the contract's 403/409 for a reserved or taken username, and ``Forbidden`` for
    anyone but the owner of a personal server."""
    try:
        # Before any account exists: a refused identity leaves no OS account behind.
        info = await accounts.claim_identity(info, auth.name)
        if auth.serves_one_person:
            owner = await accounts.claim_personal_owner(info.username)
            if owner != info.username:
                raise Forbidden(f"This server is in personal mode: it serves only {owner}.")
        account = await auth.ensure_external_account(info)
        return await accounts.sign_in_user(info, auth.name, account)
    except accounts.UsernameUnavailable as exc:
        raise ApiError(exc.message,
                       HTTP_403_FORBIDDEN if exc.reserved else HTTP_409_CONFLICT) from None
