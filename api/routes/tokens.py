"""``POST /tokens/``: a user's API key, through the configured api auth method."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post

from api import schemas
from api.body import json_body
from api.openapi import contract
from api.sign_in import admit
from api.state import app_state
from db import accounts


class TokenRoutes(Controller):
    """A sign-in turned into the user's API key."""

    path = "/tokens"
    tags = ["tokens"]

    @post("/", status_code=200, operation_id="createUserToken",
          **contract("Get a user's API key", schemas.TokenResponse, 400, 401, 403, 409, 413, 503,
                     body=schemas.TokenRequest, auth=False, examples={"api client": {
                         "client_token": "<key of an api_clients member>",
                         "user_info": {"username": "jdoe", "email": "jdoe@example.org",
                                       "first_name": "Jane", "last_name": "Doe"}}}))
    async def create_token(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Authenticate a user through the configured method and return their API key.

        The user and their external account exist before this answers, so the first request
        made with the key never races their creation. An identity provider's identity is
        matched on (issuer, subject), never on its username alone (``db.accounts``)."""
        body = await json_body(request)
        auth = app_state(request).controllers.api_auth
        info = await auth.identify(body if isinstance(body, dict) else {}, accounts.is_api_client)
        user_id = await admit(auth, info)
        key = await accounts.token_for(user_id)
        return {"success": True, "message": "Successful authentication.", "token": key}
