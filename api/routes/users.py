"""``GET /users/``: find other users to share with."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get
from litestar.params import FromQuery

from api import schemas
from api.auth import current_user
from api.openapi import contract
from api.serializers import user_json
from db import accounts, quotas


class UserRoutes(Controller):
    """Other users (to share with), and the caller's own quota."""

    path = "/users"
    tags = ["users"]

    @get("/", operation_id="searchUsers",
         **contract("Find users to share with",
                    schemas.UsersResponse, 400, 401, 503))
    async def search_users(
        self, request: Request[Any, Any, Any], search: FromQuery[str] = ""
    ) -> dict[str, Any]:
        """Users whose first and last name, or e-mail, contain ``search`` (any case); never
        the caller nor ``admin``."""
        rows = await accounts.search(current_user(request).id, search)
        users = [user_json(r) for r in rows]
        if users:
            return {"success": True, "message": "Successful.", "data": {"users": users}}
        return {"success": True,
                "message": "Users matching given parameters could not be found.",
                "data": {"users": []}}

    @get("/me/quota/", operation_id="getMyQuota",
         **contract("The caller's quota and usage",
                    schemas.QuotaResponse, 401, 503))
    async def my_quota(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The caller's limits (``null``: none), usage and reserved core-hours."""
        view = await quotas.view(current_user(request).id)
        return {"success": True, "message": "Successful.", "data": {"quota": view.as_json()}}
