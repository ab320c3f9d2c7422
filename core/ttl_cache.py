"""A small in-process cache whose entries expire: bounded (the least recently used entry
goes first), so memory stays flat whatever the traffic, and short-lived, so what it holds
is never older than its lifetime (a revoked token stops working within it)."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(self, ttl_seconds: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if time.monotonic() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V, ttl_seconds: float | None = None) -> None:
        """Keep ``value`` for the cache's lifetime, or ``ttl_seconds`` when shorter;
        nothing is kept for a lifetime of 0 or less."""
        ttl = self.ttl if ttl_seconds is None else min(self.ttl, ttl_seconds)
        if ttl <= 0:
            return
        self._entries[key] = (time.monotonic() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
