"""``LocalUserAuthentication``: trusted API clients vouch for users; users are OS accounts.

An api_clients member (a portal) posts ``{"client_token", "user_info"}`` to ``/tokens/``.
The user's external account is found (or created) before the answer, under the mode
``controllers.auth.accounts`` describes: an OS account per user (multi-user) or the
server's own account for its one person (personal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controllers.auth.accounts import INCORRECT, AccountSettings, OsAccounts
from controllers.base import ApiClientCheck, AuthMethod, ExternalAccount, UserInfo
from controllers.errors import AuthenticationFailed, InvalidRequest


class LocalUserAuthentication(AuthMethod):
    Settings = AccountSettings

    settings: AccountSettings

    def __init__(self, name: str, settings: AccountSettings) -> None:
        super().__init__(name, settings)
        self.accounts = OsAccounts(settings)

    @property
    def serves_one_person(self) -> bool:
        return self.accounts.personal

    def check_runnable(self) -> None:
        self.accounts.check_runnable()

    async def identify(self, body: Mapping[str, Any], is_api_client: ApiClientCheck) -> UserInfo:
        client_token = body.get("client_token")
        if not client_token:
            raise InvalidRequest(
                "Missing client_token. Please have admin generate a token for you."
            )
        user_info = body.get("user_info")
        if not user_info:
            raise InvalidRequest("Missing user_info. Please provide user_info to get user_token.")
        if not isinstance(client_token, str) or not await is_api_client(client_token):
            raise AuthenticationFailed(INCORRECT, log_message="client token not an api client")
        if not isinstance(user_info, dict):
            raise AuthenticationFailed(INCORRECT, log_message="user_info is not an object")
        username, email = user_info.get("username"), user_info.get("email")
        if not isinstance(username, str) or not username or not isinstance(email, str) or not email:
            raise AuthenticationFailed(INCORRECT, log_message="user_info lacks username or email")
        names = {k: user_info.get(k) or "" for k in ("first_name", "last_name")}
        if not all(isinstance(v, str) for v in names.values()):
            raise AuthenticationFailed(INCORRECT, log_message="names are not strings")
        # The columns' lengths (uws_user): a longer value must not reach the database.
        if len(username) > 150 or len(email) > 254 or any(len(v) > 150 for v in names.values()):
            raise AuthenticationFailed(INCORRECT, log_message="a user_info field is too long")
        return UserInfo(username=username, email=email, **names)

    async def ensure_external_account(self, user: UserInfo) -> ExternalAccount:
        return await self.accounts.ensure(user)
