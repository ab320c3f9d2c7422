"""Value types every layer passes around: who a user is, the account that acts for them,
what a workspace holds on disk. Plugins take them from ``controllers.base``."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field


class UserInfo(BaseModel):
    """Who a successful authentication says the user is."""

    username: str
    email: str
    first_name: str = ""
    last_name: str = ""
    # Who the identity provider says this is, for methods backed by one: the account is
    # bound to (issuer, subject), never to the username, which a provider may let its users
    # choose or reassign. ``None`` where a trusted client vouches for the username.
    issuer: str | None = None
    subject: str | None = None


class ExternalAccount(BaseModel):
    """The account that owns a user's files and runs their jobs (an OS account here)."""

    username: str
    uid: int | None = None
    gid: int | None = None
    home: str | None = None


class AccountSource(Protocol):
    """What finds (or creates) a user's account: a sign-in method (``AuthMethod``)."""

    name: str

    async def ensure_external_account(self, user: UserInfo) -> ExternalAccount: ...


class WorkspaceScan(BaseModel):
    """What is really on disk: dot-files excluded, names relative with a leading ``/``."""

    disk_space: int
    files: list[str] = Field(default_factory=list)
    symlinks: list[str] = Field(default_factory=list)
