"""Who a request acts for, and the API keys resolved lately."""

from __future__ import annotations

from dataclasses import dataclass

from core.ttl_cache import TtlCache


@dataclass(frozen=True)
class AuthUser:
    id: int
    username: str


# API keys resolved lately (``UWS_TOKEN_CACHE_SECONDS``): one database round trip less on
# most requests; a revoked key keeps working on a process for at most that long.
TokenCache = TtlCache[str, AuthUser]
