"""Piccolo tables: the durable state the API serves.

Workflows own the lifecycle of jobs, shares and deletions; these rows are what clients
read. Background writers update only the columns they own, in one statement, so a rescan
never undoes a concurrent rename (a bug of the reference server).
"""

from __future__ import annotations

from piccolo.columns import (
    JSONB,
    BigInt,
    BigSerial,
    Boolean,
    DoublePrecision,
    ForeignKey,
    Integer,
    Text,
    Timestamptz,
    Varchar,
)
from piccolo.columns.base import OnDelete
from piccolo.columns.defaults.timestamptz import TimestamptzNow
from piccolo.table import Table

from core.status import JobStatus, WorkspaceStatus


class User(Table, tablename="uws_user"):
    id = BigSerial(primary_key=True)
    username = Varchar(length=150, unique=True)
    email = Varchar(length=254, default="")
    first_name = Varchar(length=150, default="")
    last_name = Varchar(length=150, default="")
    is_active = Boolean(default=True)
    date_joined = Timestamptz(default=TimestamptzNow())


class GroupMembership(Table, tablename="uws_group_membership"):
    """Named groups of users; ``api_clients`` members may vouch for users at ``/tokens/``."""

    id = BigSerial(primary_key=True)
    user = ForeignKey(references=User, on_delete=OnDelete.cascade, index=True)
    group_name = Varchar(length=80, index=True)


class Token(Table, tablename="uws_token"):
    """One API key per user. The key is kept as issued: the contract returns the same key
    to the same user every time, so it cannot be stored as a one-way hash."""

    id = BigSerial(primary_key=True)
    key = Varchar(length=64, unique=True)
    user = ForeignKey(references=User, on_delete=OnDelete.cascade, unique=True)
    created = Timestamptz(default=TimestamptzNow())


class ExternalUserMapping(Table, tablename="uws_external_user_mapping"):
    """The account a user has under one authentication method (an OS account locally)."""

    id = BigSerial(primary_key=True)
    user = ForeignKey(references=User, on_delete=OnDelete.cascade, index=True)
    user_authentication_name = Varchar(length=100)
    external_user_id = Varchar(length=100, default="")
    external_username = Varchar(length=150)
    external_user_details = JSONB(default={})


class Workspace(Table, tablename="uws_workspace"):
    id = BigSerial(primary_key=True)
    user = ForeignKey(references=User, on_delete=OnDelete.cascade, index=True)
    name = Varchar(length=256)
    description = Text(default="")
    file_path = Text(default="")
    storage_name = Varchar(length=100, default="")
    disk_space = BigInt(default=0)
    datetime_created = Timestamptz(default=TimestamptzNow())
    datetime_last_modified = Timestamptz(default=TimestamptzNow())
    datetime_last_job_launch = Timestamptz(null=True, default=None)
    request_workspace_details = JSONB(default={})
    current_workspace_details = JSONB(default={})
    status = Varchar(length=32, default=WorkspaceStatus.initializing.value, index=True)
    status_reason = Text(default="")
    default_job_type = Varchar(length=100, null=True, default=None)
    # When the scan whose result ``disk_space`` holds started: an older scan finishing
    # later never overwrites a newer one (the quota's claims depend on it).
    disk_scanned = Timestamptz(null=True, default=None)


class Job(Table, tablename="uws_job"):
    id = BigSerial(primary_key=True)
    user = ForeignKey(references=User, on_delete=OnDelete.cascade, index=True)
    workspace = ForeignKey(references=Workspace, on_delete=OnDelete.set_null, null=True,
                           index=True)
    job_type = Varchar(length=100)
    resource_name = Varchar(length=100, default="")
    resource_job_id = BigInt(default=-1)
    status = Varchar(length=32, default=JobStatus.pending.value, index=True)
    datetime_created = Timestamptz(default=TimestamptzNow())
    datetime_start = Timestamptz(null=True, default=None)
    datetime_end = Timestamptz(null=True, default=None)
    core_hours = DoublePrecision(default=0.0)
    resource_options = JSONB(default={})
    job_details = JSONB(default={})


class UserQuota(Table, tablename="uws_user_quota"):
    """Limits (null means unlimited) and the usage tallied against them."""

    id = BigSerial(primary_key=True)
    user = ForeignKey(references=User, on_delete=OnDelete.cascade, unique=True)
    max_disk_space = BigInt(null=True, default=None)
    max_core_hours = DoublePrecision(null=True, default=None)
    used_disk_space = BigInt(default=0)
    used_core_hours = DoublePrecision(default=0.0)
    reserved_core_hours = DoublePrecision(default=0.0)


class DiskReservation(Table, tablename="uws_disk_reservation"):
    """Bytes a write has claimed against its user's disk quota before a scan counts them.

    Taken under the user's row lock (``db.quotas``), so concurrent writes of one user, in
    any API process, cannot jointly overrun the quota. ``finished`` is null while the write
    streams (``refreshed`` is its last growth: a reservation of a crashed request goes
    stale); a scan that started after ``finished`` counts the bytes itself and removes it."""

    id = BigSerial(primary_key=True)
    user = ForeignKey(references=User, on_delete=OnDelete.cascade, index=True)
    workspace = ForeignKey(references=Workspace, on_delete=OnDelete.cascade, index=True)
    bytes = BigInt(default=0)
    refreshed = Timestamptz(default=TimestamptzNow())
    finished = Timestamptz(null=True, default=None)


class SharedWorkspaceMapping(Table, tablename="uws_shared_workspace_mapping"):
    id = BigSerial(primary_key=True)
    original_workspace = ForeignKey(references=Workspace, on_delete=OnDelete.cascade,
                                    index=True)
    shared_workspace = ForeignKey(references=Workspace, on_delete=OnDelete.cascade,
                                  unique=True)
    last_resource_options = JSONB(default={})
    last_job_type = Varchar(length=100, null=True, default=None)
    is_accepted = Boolean(default=False)
    datetime_share_created = Timestamptz(default=TimestamptzNow())


class SpentTicket(Table, tablename="uws_spent_ticket"):
    """Passthrough tickets already exchanged for a cookie: each works once."""

    id = BigSerial(primary_key=True)
    nonce = Varchar(length=64, unique=True)
    expires = Timestamptz(index=True)


class BrowserCredential(Table, tablename="uws_browser_credential"):
    """The web page's sign-in: a one-time login ticket (``kind`` "ticket", from
    ``uws login-link`` or a provider sign-in) or the session it became (``kind`` "session",
    the HttpOnly cookie). Only a SHA-256 of each key is stored: a database read gives no
    working credential."""

    id = BigSerial(primary_key=True)
    kind = Varchar(length=8)
    key_hash = Varchar(length=64, unique=True)
    user = ForeignKey(references=User, on_delete=OnDelete.cascade, index=True)
    expires = Timestamptz(index=True)


class PersonalOwner(Table, tablename="uws_personal_owner"):
    """A personal server's one person: the first user to sign in (a single row, id 1)."""

    id = Integer(primary_key=True, default=1)
    username = Varchar(length=150)


ALL_TABLES: list[type[Table]] = [
    User,
    GroupMembership,
    Token,
    ExternalUserMapping,
    Workspace,
    Job,
    UserQuota,
    DiskReservation,
    SharedWorkspaceMapping,
    SpentTicket,
    BrowserCredential,
    PersonalOwner,
]
