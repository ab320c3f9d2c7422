"""A small in-process cache of token lookups.

Every authenticated request resolves its key; caching the answer for a few seconds takes
one database round trip off each request. The bound keeps memory flat; the short lifetime
bounds how long a revoked or deleted token keeps working on this process.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class AuthUser:
    id: int
    username: str


class TokenCache:
    def __init__(self, ttl_seconds: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, AuthUser]] = OrderedDict()

    def get(self, key: str) -> AuthUser | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        expires, user = hit
        if expires < time.monotonic():
            self._entries.pop(key, None)
            return None
        return user

    def put(self, key: str, user: AuthUser) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (time.monotonic() + self.ttl, user)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
