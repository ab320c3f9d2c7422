"""Quotas: checked and reserved before a launch or a write, settled to actual use later.

A launch reserves CPUs x time limit; the reservation is released and the real core-hours
added when the job ends, so concurrent launches cannot together overrun a quota.

Disk: a write (a create's or an update's files, an upload as it streams) claims its bytes
under the user's row lock before writing them, and the claim stays counted until a scan
that started after the write finished has counted the bytes itself. Every decision is
taken under that lock, in the database, so neither concurrent requests nor several API
processes can jointly overrun a quota.

Whom disk use is charged to: a user's own workspaces, except copies shared with them and
not yet accepted; those are charged to the sharer until accepted (nobody can fill someone
else's quota unasked). A copy still being made counts at least its original's size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from core.status import WorkspaceStatus
from db import sql

# A streaming write's claim not grown for this long belongs to a request that died: it is
# no longer counted (a live upload re-confirms its claim well before, see ``cover``).
STALE_MINUTES = 15
_RECONFIRM_SECONDS = STALE_MINUTES * 60 / 3
# A streaming claim grows in steps (one locked statement each), not per chunk.
_MIN_STEP = 1 << 20
_MAX_STEP = 64 << 20


def stored_disk_sql(user: str) -> str:
    """SQL for the scanned bytes charged to ``user`` (an SQL expression)."""
    return (
        "((SELECT COALESCE(SUM(w.disk_space), 0) FROM uws_workspace w "
        f'WHERE w."user" = {user} AND NOT EXISTS (SELECT 1 FROM uws_shared_workspace_mapping m '
        "WHERE m.shared_workspace = w.id AND NOT m.is_accepted)) + "
        f"(SELECT COALESCE(SUM(CASE WHEN c.status = '{WorkspaceStatus.initializing}' "
        "THEN GREATEST(c.disk_space, o.disk_space) ELSE c.disk_space END), 0) "
        "FROM uws_workspace o JOIN uws_shared_workspace_mapping m "
        "ON m.original_workspace = o.id AND NOT m.is_accepted "
        f'JOIN uws_workspace c ON c.id = m.shared_workspace WHERE o."user" = {user}))'
    )


def _claimed_sql(user: str, exclude: str) -> str:
    """SQL for the bytes live claims of ``user`` hold, claim ``exclude`` aside."""
    return (
        "(SELECT COALESCE(SUM(r.bytes), 0) FROM uws_disk_reservation r "
        f'WHERE r."user" = {user} AND r.id <> {exclude} AND (r.finished IS NOT NULL '
        f"OR r.refreshed > clock_timestamp() - interval '{STALE_MINUTES} minutes'))"
    )


async def claimed_on(conn: Any, workspace_id: int) -> int:
    """Bytes live claims hold on one workspace (written, or arriving, not yet scanned)."""
    return int(await conn.fetchval(
        "SELECT COALESCE(SUM(r.bytes), 0) FROM uws_disk_reservation r WHERE r.workspace = $1 "
        "AND (r.finished IS NOT NULL "
        f"OR r.refreshed > clock_timestamp() - interval '{STALE_MINUTES} minutes')",
        workspace_id))


_USAGE = (f"SELECT {stored_disk_sql('$1')}::bigint AS stored, "
          f"{_claimed_sql('$1', '$2')}::bigint AS claimed")


@dataclass
class QuotaView:
    max_disk_space: int | None
    used_disk_space: int
    max_core_hours: float | None
    used_core_hours: float
    reserved_core_hours: float
    reserved_disk_space: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "max_disk_space": self.max_disk_space,
            "used_disk_space": self.used_disk_space,
            "reserved_disk_space": self.reserved_disk_space,
            "max_core_hours": self.max_core_hours,
            "used_core_hours": round(self.used_core_hours, 6),
            "reserved_core_hours": round(self.reserved_core_hours, 6),
            "available_core_hours": None if self.max_core_hours is None else
            round(max(self.max_core_hours - self.used_core_hours - self.reserved_core_hours,
                      0.0), 6),
        }


class QuotaExceeded(Exception):
    pass


class WorkspaceDeleting(Exception):
    """The workspace a write claims for is being deleted (or gone): the write must stop."""


async def _usage(conn: Any, user_id: int, exclude_claim: int = 0) -> tuple[int, int]:
    """(scanned, claimed) bytes; ``conn`` is a connection or ``db.sql`` (no lock)."""
    row = await conn.fetchrow(_USAGE, user_id, exclude_claim)
    return int(row["stored"]), int(row["claimed"])


async def disk_usage(user_id: int) -> int:
    """Bytes charged to the user: scanned, plus what writes in progress have claimed."""
    stored, claimed = await _usage(sql, user_id)
    return stored + claimed


async def core_hours_used(user_id: int) -> float:
    return float(await sql.fetchval(
        'SELECT COALESCE(SUM(core_hours), 0) FROM uws_job WHERE "user" = $1', user_id))


async def view(user_id: int) -> QuotaView:
    row = await _quota_row(user_id)
    stored, claimed = await _usage(sql, user_id)
    if row is None:
        return QuotaView(None, stored, None, await core_hours_used(user_id), 0.0, claimed)
    return QuotaView(row["max_disk_space"], stored, row["max_core_hours"],
                     row["used_core_hours"], row["reserved_core_hours"], claimed)


async def set_quota(user_id: int, *, max_disk_space: int | None = None,
                    max_core_hours: float | None = None) -> None:
    await sql.execute(
        'INSERT INTO uws_user_quota ("user", max_disk_space, max_core_hours, used_disk_space, '
        "used_core_hours, reserved_core_hours) VALUES ($1, $2, $3, 0, 0, 0) "
        'ON CONFLICT ("user") DO UPDATE SET max_disk_space = EXCLUDED.max_disk_space, '
        "max_core_hours = EXCLUDED.max_core_hours",
        user_id, max_disk_space, max_core_hours,
    )


async def _quota_row(user_id: int) -> Any | None:
    return await sql.fetchrow(
        "SELECT max_disk_space, max_core_hours, used_disk_space, used_core_hours, "
        'reserved_core_hours FROM uws_user_quota WHERE "user" = $1', user_id)


_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: float) -> str:
    """``512 B``, ``1.50 MiB``, ``2.00 GiB``."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in _UNITS:
        n /= 1024
        if n < 1024 or unit == _UNITS[-1]:
            break
    return f"{n:.2f} {unit}"


def _disk_head(used: int, limit: int) -> str:
    return (f"Disk quota exceeded: your workspaces use {human_size(used)} of the "
            f"{human_size(limit)} allowed")


async def check_disk(user_id: int) -> None:
    """Refuse (before a launch) a user whose workspaces already use more than allowed."""
    limit = await disk_limit(sql, user_id)
    if limit is None:
        return
    used = await disk_usage(user_id)
    if used > limit:
        raise QuotaExceeded(
            f"{_disk_head(used, limit)} (over by {human_size(used - limit)}). "
            "Free some space to start jobs."
        )


async def lock_user(conn: Any, user_id: int) -> None:
    """The per-user mutex of quota decisions: the user's row, locked until the end of the
    transaction on ``conn`` (``NO KEY``: rows referring to the user can still be inserted)."""
    await conn.execute("SELECT 1 FROM uws_user WHERE id = $1 FOR NO KEY UPDATE", user_id)


async def disk_limit(conn: Any, user_id: int) -> int | None:
    limit = await conn.fetchval(
        'SELECT max_disk_space FROM uws_user_quota WHERE "user" = $1', user_id)
    return None if limit is None else int(limit)


async def check_disk_room(conn: Any, user_id: int, need: int, what: str) -> None:
    """Under ``lock_user``: refuse ``need`` more bytes that would overrun the quota.
    ``what`` completes the message: "these files need", "the copies ... need"."""
    limit = await disk_limit(conn, user_id)
    if limit is None or need <= 0:
        return
    stored, claimed = await _usage(conn, user_id)
    _refuse_unless_fits(stored + claimed, limit, need, what, exact=True)


def _refuse_unless_fits(used: int, limit: int, need: int, what: str, *, exact: bool) -> None:
    left = max(limit - used, 0)
    if need <= left:
        return
    if exact:
        detail = (f"{what} {human_size(need)} but only {human_size(left)} remain "
                  f"(short by {human_size(need - left)})")
    else:
        detail = f"{what} more than the {human_size(left)} that remain"
    raise QuotaExceeded(f"{_disk_head(used, limit)}; {detail}. Free some space first.")


@dataclass
class DiskClaim:
    """A write's hold on its user's disk quota. ``id`` is None while nothing is held (no
    limit, or nothing to write yet); ``granted`` is what the claim's row holds."""

    user_id: int
    workspace_id: int
    id: int | None = None
    granted: int = 0
    unlimited: bool = False
    confirmed: float = field(default_factory=time.monotonic)


async def _take(conn: Any, claim: DiskClaim, need: int, want: int, what: str,
                exact: bool) -> None:
    """Under the user's lock: make ``claim`` hold between ``need`` and ``want`` bytes, or
    raise ``QuotaExceeded`` when even ``need`` does not fit (``WorkspaceDeleting``)."""
    await lock_user(conn, claim.user_id)
    limit = await disk_limit(conn, claim.user_id)
    if limit is None:
        claim.unlimited = True
        return
    # KEY SHARE: the row cannot vanish under the claim's insert (its foreign key).
    status = await conn.fetchval(
        "SELECT status FROM uws_workspace WHERE id = $1 FOR KEY SHARE", claim.workspace_id)
    if status in (None, WorkspaceStatus.deleting):
        raise WorkspaceDeleting(claim.workspace_id)
    stored, claimed = await _usage(conn, claim.user_id, claim.id or 0)
    used = stored + claimed
    if need > 0:
        _refuse_unless_fits(used, limit, need, what, exact=exact)
    # Ahead of need by at most a quarter of what is left: room stays for concurrent writes.
    grant = max(need, min(want, need + max(limit - used - need, 0) // 4))
    if claim.id is None:
        claim.id = await conn.fetchval(
            'INSERT INTO uws_disk_reservation ("user", workspace, bytes, refreshed) '
            "VALUES ($1, $2, $3, clock_timestamp()) RETURNING id",
            claim.user_id, claim.workspace_id, grant)
    else:
        await conn.execute(
            "UPDATE uws_disk_reservation SET bytes = $2, refreshed = clock_timestamp() "
            "WHERE id = $1", claim.id, grant)
    claim.granted = grant
    claim.confirmed = time.monotonic()


async def claim_disk(user_id: int, workspace_id: int, need: int, what: str) -> DiskClaim:
    """Claim exactly ``need`` bytes (a create's or an update's files) or raise
    ``QuotaExceeded`` saying by how much they do not fit."""
    claim = DiskClaim(user_id, workspace_id)
    if need > 0:
        async with sql.transaction() as conn:
            await _take(conn, claim, need, need, what, exact=True)
    return claim


async def cover(claim: DiskClaim, total: int) -> None:
    """Grow a streaming claim to cover ``total`` bytes received so far, a step ahead;
    ``QuotaExceeded`` as soon as they no longer fit. A claim is re-confirmed now and then
    even without growth, so a slow upload's bytes never go stale while it lives."""
    if claim.unlimited:
        return
    if total <= claim.granted and time.monotonic() - claim.confirmed < _RECONFIRM_SECONDS:
        return
    step = min(max(_MIN_STEP, total // 8), _MAX_STEP)
    async with sql.transaction() as conn:
        await _take(conn, claim, total, total + step, "this upload needs", exact=False)


async def finish_claim(claim: DiskClaim, actual: int | None = None) -> None:
    """The bytes are written: hold exactly ``actual`` (default: what is held) until a scan
    that starts from now on has counted them (``settle_after_scan``)."""
    if claim.id is None:
        return
    await sql.execute(
        "UPDATE uws_disk_reservation SET finished = clock_timestamp(), "
        "bytes = COALESCE($1, bytes) WHERE id = $2", actual, claim.id)


async def drop_claim(claim: DiskClaim) -> None:
    """The write did not happen: give the bytes back at once."""
    if claim.id is not None:
        await sql.execute("DELETE FROM uws_disk_reservation WHERE id = $1", claim.id)
        claim.id, claim.granted = None, 0


async def settle_after_scan(conn: Any, workspace_id: int, scan_started: Any) -> None:
    """A scan that started at ``scan_started`` has counted every write finished before:
    their claims end (in the transaction that stores the scan), as do stale ones."""
    await conn.execute(
        "DELETE FROM uws_disk_reservation WHERE workspace = $1 AND (finished <= $2 OR "
        f"(finished IS NULL AND refreshed < clock_timestamp() - interval '{STALE_MINUTES} "
        "minutes'))", workspace_id, scan_started)


async def reserve_core_hours(user_id: int, amount: float, why: str) -> None:
    """Reserve ``amount`` core-hours or raise ``QuotaExceeded`` saying by how much."""
    reserved = await sql.fetchval(
        "UPDATE uws_user_quota SET reserved_core_hours = reserved_core_hours + $1 "
        'WHERE "user" = $2 AND (max_core_hours IS NULL OR '
        "used_core_hours + reserved_core_hours + $1 <= max_core_hours) RETURNING id",
        amount, user_id,
    )
    if reserved is not None:
        return
    row = await _quota_row(user_id)
    if row is None:
        return  # no quota for this user
    left = max(row["max_core_hours"] - row["used_core_hours"] - row["reserved_core_hours"], 0.0)
    raise QuotaExceeded(
        f"Core-hour quota exceeded: this job needs {amount:.2f} core-hours ({why}) but only "
        f"{left:.2f} of your {row['max_core_hours']:.2f} remain (short by {amount - left:.2f})."
    )


async def release_core_hours(user_id: int, amount: float) -> None:
    if amount > 0:
        await sql.execute(
            "UPDATE uws_user_quota SET reserved_core_hours = "
            'GREATEST(reserved_core_hours - $1, 0) WHERE "user" = $2', amount, user_id)


# What each user's workspaces count for their quota (shares charged to sharers).
_CHARGED_DISK = stored_disk_sql('q."user"')


async def recompute_usage() -> int:
    """Every user's usage recounted from their workspaces and jobs (the usage upkeep);
    the number of users."""
    updated = await sql.fetch(
        "UPDATE uws_user_quota q SET "
        f"used_disk_space = {_CHARGED_DISK}, "
        "used_core_hours = COALESCE((SELECT SUM(j.core_hours) FROM uws_job j "
        'WHERE j."user" = q."user" AND j.datetime_end IS NOT NULL), 0), '
        "reserved_core_hours = COALESCE((SELECT SUM((j.job_details->'metrics'->>"
        "'reserved_core_hours')::float8) FROM uws_job j "
        'WHERE j."user" = q."user" AND j.datetime_end IS NULL), 0) RETURNING q.id')
    return len(updated)
