"""Path ids: 64-bit integers; anything else names nothing (a 404, never a 500)."""

from __future__ import annotations

_MAX_ID = 2**63 - 1


def parse_id(value: str) -> int | None:
    if not value.isascii() or not value.isdigit():
        return None
    number = int(value)
    return number if 0 < number <= _MAX_ID else None
