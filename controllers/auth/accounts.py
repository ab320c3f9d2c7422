"""OS accounts behind users: the two ways a server runs, shared by every sign-in method.

* **multi-user** (the default when the server runs as root): one OS account per user,
  created on first sign-in when ``create_external_users`` is set. Jobs run as that account,
  never as root or the service account, so ``root``, system accounts (uid below
  ``min_uid``) and the server's own account are never handed to a user.
* **personal** (the default when the server is not root): one person uses the server and
  every job runs as the server's account, which is theirs. The first user to sign in owns
  the server; the API refuses anybody else (``serves_one_person``).

Many users sharing one account (the old ``single_user = true``) is gone: it let one user's
job read every other user's files and the server's secrets.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from controllers.base import ExternalAccount, PluginSettings, UserInfo
from controllers.errors import AuthenticationFailed, BackendError, Forbidden

INCORRECT = "Incorrect authentication credentials."
# A portable POSIX user name, as useradd accepts by default.
_OS_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SINGLE_USER_GONE = (
    "single_user is no longer supported: it ran every user's jobs as one account, so any "
    "user could read the others' files. Use accounts = \"multi_user\" (one OS account "
    "per user, needs root) or accounts = \"personal\" (one person, the server's own account)."
)

Mode = Literal["auto", "multi_user", "personal"]


class AccountSettings(PluginSettings):
    """How users map to OS accounts (every sign-in method's ``connection_details``)."""

    accounts: Mode = Field("auto", description="auto: multi_user as root, personal otherwise.")
    create_external_users: bool = True
    useradd_args: list[str] = ["--create-home", "--shell", "/bin/bash"]
    min_uid: int = Field(1000, ge=1, description="Accounts below this uid are the system's.")
    # Only here to be refused with the reason (an unknown key would say less).
    single_user: None = Field(None, exclude=True)

    @field_validator("single_user", mode="before")
    @classmethod
    def _no_single_user(cls, value: Any) -> None:
        raise PydanticCustomError("single_user_gone", SINGLE_USER_GONE)


def resolved_mode(mode: Mode) -> Literal["multi_user", "personal"]:
    if mode == "auto":
        return "multi_user" if os.geteuid() == 0 else "personal"
    return mode


class OsAccounts:
    """Finds (or creates) the OS account of a user under the configured mode."""

    def __init__(self, settings: AccountSettings) -> None:
        self.settings = settings
        self.mode = resolved_mode(settings.accounts)

    @property
    def personal(self) -> bool:
        return self.mode == "personal"

    def check_runnable(self) -> None:
        """Refuse a configuration that would run jobs as root (start-up)."""
        if self.personal and os.geteuid() == 0:
            raise ValueError("personal mode runs every job as the server's account, and the "
                             "server runs as root: run it as an ordinary account, or use "
                             "accounts = \"multi_user\"")
        if self.mode == "multi_user" and os.geteuid() != 0:
            raise ValueError("multi_user mode switches to each user's OS account, which "
                             "needs root: run the server as root, or use accounts = \"personal\"")

    async def ensure(self, user: UserInfo) -> ExternalAccount:
        if self.personal:
            return account_of_entry(pwd.getpwuid(os.geteuid()))
        name = user.username
        if not _OS_NAME.match(name):
            raise AuthenticationFailed(
                INCORRECT, log_message=f"{name!r} cannot be an OS account name")
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            if not self.settings.create_external_users:
                raise AuthenticationFailed(
                    INCORRECT, log_message=f"no OS account {name!r} and creation is off",
                ) from None
            await self._useradd(name)
            entry = pwd.getpwnam(name)
        self._refuse_privileged(entry)
        return account_of_entry(entry)

    def _refuse_privileged(self, entry: pwd.struct_passwd) -> None:
        """Root, system accounts and the server's own account never belong to a user."""
        uid = entry.pw_uid
        # 65534 and up: nobody and the kernel's overflow ids, shared by unrelated processes.
        if uid == 0 or uid == os.geteuid() or uid < self.settings.min_uid or uid >= 65534:
            raise Forbidden(f"The username {entry.pw_name} is reserved for the system.",
                            log_message=f"refused account {entry.pw_name} (uid {entry.pw_uid})")

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


def account_of_entry(entry: pwd.struct_passwd) -> ExternalAccount:
    return ExternalAccount(
        username=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir
    )
