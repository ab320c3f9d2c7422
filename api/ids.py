"""Path ids: 64-bit integers; anything else names nothing (a 404, never a 500)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

_MAX_ID = 2**63 - 1
T = TypeVar("T")


def parse_id(value: str) -> int | None:
    if not value.isascii() or not value.isdigit():
        return None
    number = int(value)
    return number if 0 < number <= _MAX_ID else None


async def found_or_raise(raw_id: str, find: Callable[[int], Awaitable[T | None]],
                         missing: Callable[[str], Exception]) -> T:
    """What ``find`` gives for the id ``raw_id`` names, else ``missing(raw_id)`` raised:
    an id that does not parse and someone else's row both look like no row."""
    found = None
    parsed = parse_id(raw_id)
    if parsed is not None:
        found = await find(parsed)
    if found is None:
        raise missing(raw_id)
    return found
