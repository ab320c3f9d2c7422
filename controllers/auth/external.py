"""What the sign-in methods backed by an external identity provider share.

The client posts ``{"auth_token": "<provider token>"}`` to ``/tokens/``; a subclass asks
the provider who the token belongs to (``_verify``). This base caches the answer briefly,
turns an unreachable provider into ``Unavailable`` (never a success, never a 500), and maps
the identity to an OS account with ``controllers.auth.accounts``' logic, after an
optional ``account_map`` (identity username -> OS account name).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

import httpx
from pydantic import Field

from controllers.auth.accounts import INCORRECT, AccountSettings, OsAccounts
from controllers.base import (
    ApiClientCheck,
    AuthMethod,
    ExternalAccount,
    Health,
    PluginSettings,
    UserInfo,
)
from controllers.errors import AuthenticationFailed, BackendError, InvalidRequest, Unavailable
from core.ttl_cache import TtlCache

MISSING_TOKEN = "Missing auth_token."
PROVIDER_DOWN = "The identity provider is unavailable right now. Please try again shortly."
MISCONFIGURED = "Sign-in is misconfigured. Please contact an administrator."
# Longer than any real access token; bounds what we hash and forward.
_MAX_TOKEN_CHARS = 16_384
# /status/ may be polled often: one probe of the provider per this many seconds.
HEALTH_CACHE_SECONDS = 5.0
# RFC 6749 5.2 / RFC 7662 2.3: the provider refusing *us*, not the token.
_CLIENT_ERRORS = {"invalid_client", "unauthorized_client"}


def env_is_set(name: str) -> str:
    """Field validator body: the named environment variable must exist at start-up."""
    if not name:
        raise ValueError("must name an environment variable")
    if not os.environ.get(name):
        raise ValueError(f"environment variable {name!r} is not set")
    return name


class ExternalAuthSettings(AccountSettings):
    # OS accounts (mode, creation) as LocalUserAuthentication maps them, plus:
    account_map: dict[str, str] = Field(
        default_factory=dict, description="Identity username -> OS account name."
    )
    unmapped_users: Literal["deny", "local_part"] = Field(
        "deny", description="An identity not in account_map: refused, or the part of its "
                            "username before '@' names the OS account."
    )
    timeout_seconds: float = Field(10.0, gt=0)
    cache_seconds: float = Field(
        60.0, ge=0, description="How long a token's identity is trusted (never past its exp)."
    )
    cache_size: int = Field(1024, ge=1)


class IdentityCache:
    """Token -> identity, bounded, keyed by the token's hash (the cache holds no usable
    token), each entry dropped at the earlier of ``ttl`` and the token's own expiry."""

    def __init__(self, ttl: float, size: int) -> None:
        self._cache: TtlCache[str, UserInfo] = TtlCache(ttl, size)

    @staticmethod
    def key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def get(self, token: str) -> UserInfo | None:
        return self._cache.get(self.key(token))

    def put(self, token: str, info: UserInfo, expires_at: float | None) -> None:
        left = None if expires_at is None else expires_at - time.time()
        self._cache.put(self.key(token), info, left)


def reject(reason: str) -> AuthenticationFailed:
    """The contract's one answer for every failed lookup; the reason goes to the log."""
    return AuthenticationFailed(INCORRECT, log_message=reason)


def as_list(value: Any) -> list[str]:
    """A claim that may be one string or a list of them (``aud``, groups)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def check_introspected(claims: Mapping[str, Any], *, audiences: set[str], issuer: str,
                       leeway: float, require_exp: bool, require_iss: bool,
                       client_id_is_audience: bool = False) -> None:
    """Time, issuer and audience of introspected claims; ``aud`` must name one of
    ``audiences`` (``client_id`` too only with ``client_id_is_audience``: the client a token
    was issued to is not the API it is meant for, so by default a portal's token for
    another API does not pass here). An empty ``issuer`` accepts any."""
    now = time.time()
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if not isinstance(exp, int | float):
        if require_exp:
            raise reject("token without exp")
    elif exp <= now - leeway:
        raise reject("token expired")
    if isinstance(nbf, int | float) and nbf > now + leeway:
        raise reject("token not valid yet")
    iss = claims.get("iss", None if require_iss else issuer)
    if issuer and iss != issuer:
        raise reject(f"token issued by {iss!r}")
    named = set(as_list(claims.get("aud")))
    if client_id_is_audience:
        named.update(as_list(claims.get("client_id")))
    if not audiences & named:
        raise reject(f"token not meant for this server (aud {claims.get('aud')!r})")


def subject_of(claims: Mapping[str, Any], what: str) -> str:
    """The token's ``sub``, the identity an account is bound to; without it a token only
    names a username, which is not enough to tell two people apart."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 255:
        raise reject(f"{what}: token without a usable sub")
    return sub


class ExternalUserAuthentication(AuthMethod):
    """Base of the token-based methods; subclasses implement ``_verify``."""

    abstract = True
    takes_auth_token = True
    Settings = ExternalAuthSettings
    settings: ExternalAuthSettings

    def __init__(self, name: str, settings: PluginSettings) -> None:
        super().__init__(name, settings)
        s = self.settings
        self.accounts = OsAccounts(s)
        self._cache = IdentityCache(s.cache_seconds, s.cache_size)
        self._health: tuple[float, Health] | None = None
        self._health_lock = asyncio.Lock()

    @abstractmethod
    async def _probe(self) -> Health:
        """One check that the provider answers what sign-in needs (``health``)."""

    async def health(self) -> Health:
        """The provider's endpoint reachable and answering as expected, probed at most once
        per ``HEALTH_CACHE_SECONDS`` (``/status/`` must not hammer the provider)."""
        async with self._health_lock:
            now = time.monotonic()
            if self._health is not None and now < self._health[0]:
                return self._health[1]
            try:
                result = await self._probe()
            except (Unavailable, BackendError) as exc:
                result = Health(ok=False, detail=exc.log_message)
            except Exception as exc:  # a health check reports, it never raises
                result = Health(ok=False, detail=f"{type(exc).__name__}: {exc}")
            self._health = (time.monotonic() + HEALTH_CACHE_SECONDS, result)
            return result

    async def _probe_introspection(self, url: str, form: dict[str, str],
                                   auth: tuple[str, str] | None) -> Health:
        """Introspect a token that cannot exist: a provider that knows our client answers
        ``active: false`` (or refuses the token with a 400); one that does not, 401."""
        response = await self._call("POST", url, data={**form, "token": "uws-health-check"},
                                    auth=auth)
        if response.status_code == 200 or (response.status_code == 400
                                           and _error_code(response) not in _CLIENT_ERRORS):
            return Health(ok=True)
        # The status only: /status/ is public, the provider's wording is for the log.
        return Health(ok=False, detail=f"introspection answered {response.status_code}")

    @abstractmethod
    async def _verify(self, token: str) -> tuple[UserInfo, float | None]:
        """Who ``token`` belongs to and when it expires (epoch seconds, ``None``: unknown);
        raise ``reject(...)`` when it does not identify an allowed user."""

    async def identify(self, body: Mapping[str, Any], is_api_client: ApiClientCheck) -> UserInfo:
        token = body.get("auth_token")
        if not token:
            raise InvalidRequest(MISSING_TOKEN)
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
            raise reject("auth_token is not a string of a sensible length")
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        info, expires_at = await self._verify(token)
        self._cache.put(token, info, expires_at)
        return info

    async def ensure_external_account(self, user: UserInfo) -> ExternalAccount:
        s = self.settings
        if self.accounts.personal:
            return await self.accounts.ensure(user)
        os_name = s.account_map.get(user.username)
        if os_name is None and s.unmapped_users == "local_part":
            os_name = user.username.split("@", 1)[0].lower()
        if not os_name:
            raise reject(f"{user.username!r} has no OS account mapping")
        return await self.accounts.ensure(user.model_copy(update={"username": os_name}))

    @property
    def serves_one_person(self) -> bool:
        return self.accounts.personal

    def check_runnable(self) -> None:
        self.accounts.check_runnable()

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request to the provider; unreachable or 5xx is ``Unavailable``. A sign-in is
        rare and its result cached, so a client per call keeps no pool across event loops."""
        try:
            async with httpx.AsyncClient(timeout=self.settings.timeout_seconds) as client:
                response = await client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise Unavailable(PROVIDER_DOWN,
                              log_message=f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            raise Unavailable(PROVIDER_DOWN,
                              log_message=f"{method} {url}: HTTP {response.status_code}")
        return response

    async def _introspect(self, url: str, form: dict[str, str],
                          auth: tuple[str, str] | None, what: str) -> dict[str, Any]:
        """An RFC 7662 introspection (Globus Auth's is one): the claims of an active token."""
        response = await self._call("POST", url, data=form, auth=auth)
        if response.status_code == 400 and _error_code(response) not in _CLIENT_ERRORS:
            # unsupported_token_type, invalid_token, invalid_request: how some providers
            # answer a token they do not know (a JWT of another issuer, say). The token is
            # refused; only the provider refusing our client (401, invalid_client) is ours.
            raise reject(f"{what} refused the token: {response.text[:200]}")
        if response.status_code != 200:
            raise BackendError(MISCONFIGURED, log_message=(
                f"{what} answered {response.status_code}: {response.text[:200]}"
            ))
        claims = self._json(response, what)
        if not isinstance(claims, dict) or claims.get("active") is not True:
            raise reject(f"{what}: token not active")
        return claims

    @staticmethod
    def _json(response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise BackendError(MISCONFIGURED,
                               log_message=f"{what} answered something not JSON") from exc


def _error_code(response: httpx.Response) -> str:
    """The OAuth ``error`` of an error answer, ``""`` when it has none."""
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) else ""
