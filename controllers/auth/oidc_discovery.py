"""The provider's endpoints, from its OpenID Connect Discovery document.

An operator names the issuer; its ``/.well-known/openid-configuration`` (OIDC Discovery 1.0
section 4) gives the introspection, JWKS, userinfo and token endpoints. A URL set in the
configuration wins over the discovered one. The document is read on first use (start-up
must not depend on the provider being up) and again after ``max_age``; its ``issuer`` must
be the configured one exactly (section 4.3), or a document served at the wrong place (or by
someone else) would choose where our tokens are checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from controllers.auth.external import MISCONFIGURED
from controllers.errors import BackendError

WELL_KNOWN = "/.well-known/openid-configuration"
# Discovery metadata names (OIDC Discovery 3, RFC 8414 2).
ENDPOINT_KEYS = {
    "introspection": "introspection_endpoint",
    "jwks": "jwks_uri",
    "userinfo": "userinfo_endpoint",
    "token": "token_endpoint",
    "authorization": "authorization_endpoint",
}

Fetch = Callable[[str], Awaitable[httpx.Response]]


def discovery_url_for(issuer: str) -> str:
    """Where the issuer publishes its metadata: the well-known path appended to it."""
    return issuer.rstrip("/") + WELL_KNOWN


def _is_http_url(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 2048:
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


class ProviderEndpoints:
    """Endpoint URLs by name (``introspection``, ``jwks``, ``userinfo``, ``token``):
    ``configured`` ones as given, the rest from the discovery document when there is one."""

    def __init__(self, *, issuer: str, discovery_url: str | None,
                 configured: dict[str, str], max_age: float, fetch: Fetch) -> None:
        self.issuer = issuer
        self.discovery_url = discovery_url
        self.configured = {k: v for k, v in configured.items() if v}
        self.max_age = max_age
        self._fetch = fetch
        self._discovered: dict[str, str] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def get(self, name: str) -> str | None:
        """The URL of endpoint ``name``, ``None`` when neither the configuration nor the
        provider names one. Raises ``Unavailable`` (provider down) or ``BackendError``
        (a document that is not the configured issuer's)."""
        if name in self.configured:
            return self.configured[name]
        if self.discovery_url is None:
            return None
        await self._refresh_if_due()
        return self._discovered.get(name)

    async def _refresh_if_due(self) -> None:
        def due() -> bool:
            return (self._fetched_at is None
                    or time.monotonic() - self._fetched_at >= self.max_age)
        if not due():
            return
        async with self._lock:
            if due():  # nobody else refreshed while we waited
                self._discovered = await self._read_document()
                self._fetched_at = time.monotonic()
                self.fetches += 1

    async def _read_document(self) -> dict[str, str]:
        assert self.discovery_url is not None
        response = await self._fetch(self.discovery_url)
        if response.status_code != 200:
            raise BackendError(MISCONFIGURED, log_message=(
                f"discovery document {self.discovery_url} answered {response.status_code}"))
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise BackendError(MISCONFIGURED, log_message=(
                f"discovery document {self.discovery_url} is not a JSON object"))
        if doc.get("issuer") != self.issuer:
            raise BackendError(MISCONFIGURED, log_message=(
                f"discovery document names issuer {doc.get('issuer')!r}, "
                f"configured issuer is {self.issuer!r}"))
        return {name: doc[key] for name, key in ENDPOINT_KEYS.items()
                if _is_http_url(doc.get(key))}
