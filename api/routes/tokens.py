"""``POST /tokens/``: a user's API key, through the configured api auth method."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar.status_codes import HTTP_403_FORBIDDEN, HTTP_409_CONFLICT

from api.body import json_body
from api.errors import ApiError
from api.state import app_state
from controllers.errors import Forbidden
from db import accounts


class TokenRoutes(Controller):
    path = "/tokens"
    tags = ["tokens"]

    @post("/", status_code=200, operation_id="createUserToken")
    async def create_token(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Authenticate a user through the configured method and return their API key.

        The user and their external account exist before this answers, so the first request
        made with the key never races their creation. An identity provider's identity is
        matched on (issuer, subject), never on its username alone (``db.accounts``)."""
        body = await json_body(request)
        auth = app_state(request).controllers.api_auth
        info = await auth.identify(body if isinstance(body, dict) else {}, accounts.is_api_client)
        try:
            # Before any account exists: a refused identity leaves no OS account behind.
            info = await accounts.claim_identity(info, auth.name)
            if auth.serves_one_person:
                owner = await accounts.claim_personal_owner(info.username)
                if owner != info.username:
                    raise Forbidden(f"This server is in personal mode: it serves only {owner}.")
            account = await auth.ensure_external_account(info)
            user_id = await accounts.sign_in_user(info, auth.name, account)
        except accounts.UsernameUnavailable as exc:
            raise ApiError(exc.message,
                           HTTP_403_FORBIDDEN if exc.reserved else HTTP_409_CONFLICT) from None
        key = await accounts.token_for(user_id)
        return {"success": True, "message": "Successful authentication.", "token": key}
