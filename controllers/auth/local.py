"""``LocalUserAuthentication``: trusted API clients vouch for users; users are OS accounts.

An api_clients member (a portal) posts ``{"client_token", "user_info"}`` to ``/tokens/``.
The user's external account is an OS account of the same name, looked up (or created with
``useradd`` when ``create_external_users`` is set) before the answer; with
``single_user`` every user maps to the server's own account, for the embedded default and
unprivileged installs.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
from collections.abc import Mapping
from typing import Any

from controllers.base import (
    ApiClientCheck,
    AuthMethod,
    ExternalAccount,
    PluginSettings,
    UserInfo,
)
from controllers.errors import AuthenticationFailed, BackendError, InvalidRequest

INCORRECT = "Incorrect authentication credentials."
# A portable POSIX user name, as useradd accepts by default.
_OS_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class LocalUserAuthentication(AuthMethod):
    class Settings(PluginSettings):
        single_user: bool = False
        create_external_users: bool = False
        useradd_args: list[str] = ["--create-home", "--shell", "/bin/bash"]

    settings: Settings

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
        if len(username) > 150 or len(email) > 254:
            raise AuthenticationFailed(INCORRECT, log_message="username or email too long")
        return UserInfo(username=username, email=email, **names)

    async def ensure_external_account(self, user: UserInfo) -> ExternalAccount:
        if self.settings.single_user:
            return _account(pwd.getpwuid(os.geteuid()))
        if not _OS_NAME.match(user.username):
            raise AuthenticationFailed(
                INCORRECT, log_message=f"{user.username!r} cannot be an OS account name"
            )
        try:
            return _account(pwd.getpwnam(user.username))
        except KeyError:
            pass
        if not self.settings.create_external_users:
            raise AuthenticationFailed(
                INCORRECT, log_message=f"no OS account {user.username!r} and creation is off"
            )
        await self._useradd(user.username)
        return _account(pwd.getpwnam(user.username))

    async def _useradd(self, username: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            "useradd", *self.settings.useradd_args, username,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        # Exit 9 means the name exists: a concurrent request created it first.
        if proc.returncode not in (0, 9):
            raise BackendError(
                "Could not create the user's account. Please contact an administrator.",
                log_message=f"useradd {username} failed: {err.decode(errors='replace')}",
            )


def _account(entry: pwd.struct_passwd) -> ExternalAccount:
    return ExternalAccount(
        username=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir
    )
