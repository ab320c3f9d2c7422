"""Quotas: checked and reserved before a launch, settled to actual use at the end.

A launch reserves CPUs x time limit; the reservation is released and the real core-hours
added when the job ends, so concurrent launches cannot together overrun a quota.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from db.tables import UserQuota, Workspace


@dataclass
class QuotaView:
    max_disk_space: int | None
    used_disk_space: int
    max_core_hours: float | None
    used_core_hours: float
    reserved_core_hours: float

    def as_json(self) -> dict[str, Any]:
        return {
            "max_disk_space": self.max_disk_space,
            "used_disk_space": self.used_disk_space,
            "max_core_hours": self.max_core_hours,
            "used_core_hours": round(self.used_core_hours, 6),
            "reserved_core_hours": round(self.reserved_core_hours, 6),
            "available_core_hours": None if self.max_core_hours is None else
            round(max(self.max_core_hours - self.used_core_hours - self.reserved_core_hours,
                      0.0), 6),
        }


class QuotaExceeded(Exception):
    pass


async def disk_usage(user_id: int) -> int:
    rows = await Workspace.raw(
        'SELECT COALESCE(SUM(disk_space), 0)::bigint AS used FROM uws_workspace '
        'WHERE "user" = {}', user_id)
    return int(rows[0]["used"])


async def core_hours_used(user_id: int) -> float:
    rows = await Workspace.raw(
        'SELECT COALESCE(SUM(core_hours), 0) AS used FROM uws_job WHERE "user" = {}', user_id)
    return float(rows[0]["used"])


async def view(user_id: int) -> QuotaView:
    row = await UserQuota.select().where(UserQuota.user == user_id).first()
    disk = await disk_usage(user_id)
    if row is None:
        return QuotaView(None, disk, None, await core_hours_used(user_id), 0.0)
    return QuotaView(row["max_disk_space"], disk, row["max_core_hours"],
                     row["used_core_hours"], row["reserved_core_hours"])


async def set_quota(user_id: int, *, max_disk_space: int | None = None,
                    max_core_hours: float | None = None) -> None:
    await UserQuota.raw(
        'INSERT INTO uws_user_quota ("user", max_disk_space, max_core_hours, used_disk_space, '
        "used_core_hours, reserved_core_hours) VALUES ({}, {}, {}, 0, 0, 0) "
        'ON CONFLICT ("user") DO UPDATE SET max_disk_space = EXCLUDED.max_disk_space, '
        "max_core_hours = EXCLUDED.max_core_hours",
        user_id, max_disk_space, max_core_hours,
    )


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


async def check_disk(user_id: int) -> None:
    row = await UserQuota.select(UserQuota.max_disk_space).where(UserQuota.user == user_id).first()
    if row is None or row["max_disk_space"] is None:
        return
    used, limit = await disk_usage(user_id), row["max_disk_space"]
    if used > limit:
        raise QuotaExceeded(
            f"Disk quota exceeded: your workspaces use {_gib(used)} of the {_gib(limit)} "
            f"allowed (over by {_gib(used - limit)}). Free some space to start jobs."
        )


async def reserve_core_hours(user_id: int, amount: float, why: str) -> None:
    """Reserve ``amount`` core-hours or raise ``QuotaExceeded`` saying by how much."""
    reserved = await UserQuota.raw(
        "UPDATE uws_user_quota SET reserved_core_hours = reserved_core_hours + {} "
        'WHERE "user" = {} AND (max_core_hours IS NULL OR '
        "used_core_hours + reserved_core_hours + {} <= max_core_hours) RETURNING id",
        amount, user_id, amount,
    )
    if reserved:
        return
    row = await UserQuota.select().where(UserQuota.user == user_id).first()
    if row is None:
        return  # no quota for this user
    left = max(row["max_core_hours"] - row["used_core_hours"] - row["reserved_core_hours"], 0.0)
    raise QuotaExceeded(
        f"Core-hour quota exceeded: this job needs {amount:.2f} core-hours ({why}) but only "
        f"{left:.2f} of your {row['max_core_hours']:.2f} remain (short by {amount - left:.2f})."
    )


async def release_core_hours(user_id: int, amount: float) -> None:
    if amount > 0:
        await UserQuota.raw(
            "UPDATE uws_user_quota SET reserved_core_hours = "
            'GREATEST(reserved_core_hours - {}, 0) WHERE "user" = {}', amount, user_id)
