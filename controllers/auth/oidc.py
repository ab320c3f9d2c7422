"""``OIDCUserAuthentication``: sign-in with any OAuth 2.0 / OpenID Connect provider.

The body is the Globus flow's, ``{"auth_token": "<access token>"}``; ``mode`` says how the
token is checked:

- ``introspection`` (RFC 7662): ``POST token=...`` to ``introspection_url`` with our client
  credentials (basic or form), then ``active``, ``exp``/``nbf``, ``iss`` and ``aud`` are
  checked here as well, since a provider may describe tokens meant for other clients
  (``client_id`` counts as an audience only with ``accept_client_id_as_audience``); a 400
  about the token (``invalid_token``, ``unsupported_token_type``) is a refusal, a 401 or
  ``invalid_client`` a misconfiguration;
- ``jwt``: the token is a JWT signed by a key of the provider's JWKS: the algorithm must be
  in ``algorithms`` (asymmetric only: never ``none`` or HMAC, which a public key would let
  anyone forge), its ``typ`` must be ``at+jwt`` (RFC 9068: an ID token is no access token;
  ``require_at_jwt_typ = false`` for providers that do not set it), and the signature,
  ``iss``, ``aud``, ``exp`` and ``nbf`` (with ``leeway_seconds``) must hold. The JWKS is
  fetched on first use and kept; an unknown ``kid`` fetches it again at once, at most once
  per ``jwks_min_refetch_seconds`` (meanwhile such a token is a 503, not a 401: the key may
  be a rotated one not yet seen), and a JWKS older than ``jwks_max_age_seconds`` is fetched
  again before use, so a key the provider stopped publishing is trusted that long at most.

Endpoints not configured are read from the issuer's discovery document
(``oidc_discovery``). Claims give the identity (names configurable); a username, e-mail or
(with ``required_group``) groups claim the token lacks is asked of the userinfo endpoint
with the token itself, and its ``sub`` must be the token's (OIDC Core 5.3.2); a claim still
missing is named in the answer. ``required_group`` must be in the groups claim when set.
The identity is (``iss``, ``sub``): the username claim only names the account the first
time.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Literal
from urllib.parse import urlencode

import jwt
from pydantic import Field, field_validator, model_validator

from controllers.auth.external import (
    MISCONFIGURED,
    ExternalAuthSettings,
    ExternalUserAuthentication,
    as_list,
    check_introspected,
    env_is_set,
    reject,
    subject_of,
)
from controllers.auth.oidc_discovery import ProviderEndpoints, discovery_url_for
from controllers.base import Health, UserInfo
from controllers.errors import AuthenticationFailed, BackendError, Forbidden, Unavailable

# Asymmetric JWS algorithms only (RFC 7518): a verifier holding a public key must never
# accept "none" or an HMAC keyed with that public key.
SAFE_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                   "ES256", "ES384", "ES512", "EdDSA")


# Authenticated but not admitted: a 403, as the Globus method answers.
NOT_IN_GROUP = ("User is not a member of the required group. "
                "Please contact your administrator for access.")
KEYS_REFRESHING = ("The identity provider's keys are being refreshed. "
                   "Please try again shortly.")
MISSING_CLAIM = ("The identity provider did not supply the {claim!r} claim for this sign-in "
                 "(neither in the token nor from userinfo). Please contact an administrator.")
# RFC 9068 2.1; "application/" may be left out (RFC 7515 4.1.9), case does not matter.
_AT_JWT_TYPES = {"at+jwt", "application/at+jwt"}

class JwksCache:
    """The provider's signing keys by ``kid``, refetched for an unknown one (rate-limited)
    and when older than ``max_age``."""

    def __init__(self, owner: OIDCUserAuthentication) -> None:
        self.owner = owner
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.fetched_at: float | None = None
        self.fetches = 0
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for ``kid``, ``None`` when a JWKS fetched for it does not have it.
        Raises ``Unavailable`` when the kid is unknown and a refetch is not allowed yet."""
        s = self.owner.settings
        now = time.monotonic()
        # Past max_age the keys are not used at all: a key the provider withdrew (leaked,
        # rotated out) must not outlive it, even if no unknown kid ever forces a refetch.
        stale = self.fetched_at is None or now - self.fetched_at >= s.jwks_max_age_seconds
        unknown = self._find(kid) is None
        may_refetch = (self.fetched_at is None
                       or now - self.fetched_at >= s.jwks_min_refetch_seconds)
        if stale or (unknown and may_refetch):
            fetched_at = self.fetched_at
            async with self._lock:
                if self.fetched_at == fetched_at:  # nobody refetched while we waited
                    await self._fetch()
            return self._find(kid)  # a JWKS fetched just now: an unknown kid is unknown
        if unknown:
            # Probably a key rotated in after our last fetch: "try again" is the truth,
            # "incorrect credentials" would make a client drop a good token.
            raise Unavailable(KEYS_REFRESHING, log_message=(
                f"JWT signed with unknown key {kid!r}; JWKS refetch not allowed yet"))
        return self._find(kid)

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return self.keys.get(kid)

    async def _fetch(self) -> None:
        s = self.owner.settings
        url = await self.owner.endpoints.get("jwks")
        if url is None:
            raise BackendError(MISCONFIGURED, log_message="the provider publishes no jwks_uri")
        response = await self.owner._call("GET", url)
        if response.status_code != 200:
            raise BackendError(MISCONFIGURED,
                               log_message=f"JWKS answered {response.status_code}")
        data = self.owner._json(response, "JWKS")
        keys: dict[str | None, jwt.PyJWK] = {}
        for jwk in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(jwk)
            except jwt.PyJWTError:
                continue  # a key type or curve we do not verify with
            if key.algorithm_name in s.algorithms:
                keys[jwk.get("kid")] = key
        self.keys = keys
        self.fetched_at = time.monotonic()
        self.fetches += 1


class OIDCUserAuthentication(ExternalUserAuthentication):
    class Settings(ExternalAuthSettings):
        mode: Literal["introspection", "jwt"]
        issuer: str = Field("", description="Expected iss; required in jwt mode and for "
                                             "discovery.")
        discovery: bool = Field(True, description="Read unset endpoint URLs from the "
                                                  "issuer's openid-configuration.")
        discovery_url: str = Field("", description="The discovery document, when not at "
                                                   "<issuer>/.well-known/openid-configuration.")
        discovery_max_age_seconds: float = Field(86400.0, gt=0)
        userinfo_url: str = ""
        # the web page's sign-in (/ui/): authorization code + PKCE as a public client
        web_client_id: str = Field("", description="A public client registered for the web "
                                                   "page; empty: no provider sign-in there.")
        web_scope: str = "openid profile email"
        web_resource: str = Field("", description="RFC 8707 resource indicator to ask for.")
        authorization_url: str = ""
        token_url: str = ""
        use_userinfo: bool = Field(True, description="Ask userinfo for the claims a token "
                                                     "lacks (username, e-mail, groups).")
        audience: list[str] = Field(min_length=1, description="Accepted aud.")
        accept_client_id_as_audience: bool = Field(
            False, description="Introspection: a token whose client_id (not aud) is in "
                               "audience passes too (providers that set no aud).")
        # introspection mode
        introspection_url: str = ""
        client_id: str = ""
        client_secret_env: str = ""
        client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
        # jwt mode
        jwks_url: str = ""
        algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
        jwks_min_refetch_seconds: float = Field(30.0, ge=0)
        jwks_max_age_seconds: float = Field(3600.0, gt=0)
        require_at_jwt_typ: bool = Field(
            True, description="JWT header typ must be at+jwt (RFC 9068).")
        leeway_seconds: float = Field(30.0, ge=0, le=300)
        # claims
        username_claim: str = "preferred_username"
        email_claim: str = "email"
        first_name_claim: str = "given_name"
        last_name_claim: str = "family_name"
        groups_claim: str = "groups"
        required_group: str | None = None

        @field_validator("algorithms")
        @classmethod
        def _asymmetric_only(cls, value: list[str]) -> list[str]:
            bad = [a for a in value if a not in SAFE_ALGORITHMS]
            if bad:
                raise ValueError(f"{bad} not allowed; use some of {list(SAFE_ALGORITHMS)}")
            return value

        @field_validator("client_secret_env")
        @classmethod
        def _secret_set(cls, value: str) -> str:
            return env_is_set(value) if value else value

        @property
        def discovers(self) -> bool:
            return self.discovery and bool(self.issuer or self.discovery_url)

        @model_validator(mode="after")
        def _mode_needs(self) -> OIDCUserAuthentication.Settings:
            needed = {"introspection": ["client_id", "client_secret_env"],
                      "jwt": ["issuer"]}[self.mode]
            if not self.discovers:  # without discovery every endpoint is given by hand
                needed.insert(0, {"introspection": "introspection_url",
                                  "jwt": "jwks_url"}[self.mode])
            missing = [k for k in needed if not getattr(self, k)]
            if missing:
                raise ValueError(f"mode {self.mode!r} needs {', '.join(missing)}")
            return self

    settings: Settings

    def __init__(self, name: str, settings: Any) -> None:
        super().__init__(name, settings)
        s = self.settings
        self.jwks = JwksCache(self)
        self.endpoints = ProviderEndpoints(
            issuer=s.issuer,
            discovery_url=(s.discovery_url or discovery_url_for(s.issuer)) if s.discovers
            else None,
            configured={"introspection": s.introspection_url, "jwks": s.jwks_url,
                        "userinfo": s.userinfo_url, "authorization": s.authorization_url,
                        "token": s.token_url},
            max_age=s.discovery_max_age_seconds,
            fetch=lambda url: self._call("GET", url))

    @property
    def token_source(self) -> str:
        s = self.settings
        return f"an access token for audience {s.audience[0]!r} from {s.issuer or 'your provider'}"

    @property
    def web_sign_in(self) -> bool:
        return bool(self.settings.web_client_id)

    async def authorization_request(self, redirect_uri: str, state: str, challenge: str) -> str:
        s = self.settings
        url = await self.endpoints.get("authorization")
        if url is None:
            raise BackendError(MISCONFIGURED,
                               log_message="the provider publishes no authorization_endpoint")
        params = {"response_type": "code", "client_id": s.web_client_id,
                  "redirect_uri": redirect_uri, "scope": s.web_scope, "state": state,
                  "code_challenge": challenge, "code_challenge_method": "S256",
                  **({"resource": s.web_resource} if s.web_resource else {})}
        return f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"

    async def redeem_code(self, code: str, verifier: str, redirect_uri: str) -> str:
        s = self.settings
        url = await self.endpoints.get("token")
        if url is None:
            raise BackendError(MISCONFIGURED, log_message="the provider publishes no "
                                                          "token_endpoint")
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "client_id": s.web_client_id, "code_verifier": verifier,
                **({"resource": s.web_resource} if s.web_resource else {})}
        response = await self._call("POST", url, data=form)
        body = self._json(response, "token endpoint") if response.status_code == 200 else None
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            # invalid_grant (a replayed or expired code) and the like: sign in again.
            raise reject(f"token endpoint answered {response.status_code}: "
                         f"{response.text[:200]}")
        return token

    async def _verify(self, token: str) -> tuple[UserInfo, float | None]:
        if self.settings.mode == "jwt":
            claims = await self._jwt_claims(token)
        else:
            claims = await self._introspected_claims(token)
        exp = claims.get("exp")
        claims = await self._with_userinfo(token, claims)
        return self._user(claims), float(exp) if isinstance(exp, int | float) else None

    async def _probe(self) -> Health:
        s = self.settings
        url = await self.endpoints.get("jwks" if s.mode == "jwt" else "introspection")
        if url is None:
            return Health(ok=False, detail=f"the provider publishes no {s.mode} endpoint")
        if s.mode == "introspection":
            form, auth = self._client_auth()
            return await self._probe_introspection(url, form, auth)
        response = await self._call("GET", url)
        if response.status_code != 200:
            return Health(ok=False, detail=f"JWKS answered {response.status_code}")
        data = self._json(response, "JWKS")
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            return Health(ok=False, detail="JWKS answered no key list")
        return Health(ok=True)

    def _client_auth(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        """Our client credentials for the introspection, as form fields or basic auth."""
        s = self.settings
        secret = os.environ.get(s.client_secret_env, "")
        if s.client_auth == "client_secret_basic":
            return {}, (s.client_id, secret)
        return {"client_id": s.client_id, "client_secret": secret}, None

    async def _jwt_claims(self, token: str) -> dict[str, Any]:
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise reject(f"not a JWT: {exc}") from None
        alg = header.get("alg")
        if alg not in s.algorithms:
            raise reject(f"JWT algorithm {alg!r} not allowed")
        typ = header.get("typ")
        if s.require_at_jwt_typ and (not isinstance(typ, str)
                                     or typ.lower() not in _AT_JWT_TYPES):
            # An ID token has the same issuer and keys, and names our client as aud when
            # the portal is that client: only typ tells it is no access token.
            raise reject(f"JWT typ {typ!r} is not at+jwt")
        key = await self.jwks.key(header.get("kid"))
        if key is None:
            raise reject(f"JWT signed with unknown key {header.get('kid')!r}")
        try:
            return jwt.decode(
                token, key=key, algorithms=s.algorithms, audience=s.audience, issuer=s.issuer,
                leeway=s.leeway_seconds, options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise reject(f"JWT rejected: {type(exc).__name__}: {exc}") from None

    async def _introspected_claims(self, token: str) -> dict[str, Any]:
        s = self.settings
        form, auth = self._client_auth()
        form.update(token=token, token_type_hint="access_token")
        url = await self.endpoints.get("introspection")
        if url is None:
            raise BackendError(MISCONFIGURED,
                               log_message="the provider publishes no introspection_endpoint")
        claims = await self._introspect(url, form, auth, "introspection")
        check_introspected(claims, audiences=set(s.audience), issuer=s.issuer,
                           leeway=s.leeway_seconds, require_exp=False, require_iss=True,
                           client_id_is_audience=s.accept_client_id_as_audience)
        return claims

    def _needed_claims(self) -> list[str]:
        s = self.settings
        return [s.username_claim, s.email_claim,
                *([s.groups_claim] if s.required_group is not None else [])]

    async def _with_userinfo(self, token: str, claims: dict[str, Any]) -> dict[str, Any]:
        """``claims`` completed from userinfo when the token lacks a claim sign-in needs
        (access tokens often carry only ``sub``); the token's own claims always win."""
        missing = [c for c in self._needed_claims() if claims.get(c) in (None, "", [])]
        if not missing or not self.settings.use_userinfo:
            return claims
        url = await self.endpoints.get("userinfo")
        if url is None:
            return claims
        response = await self._call("GET", url, headers={"Authorization": f"Bearer {token}"})
        if response.status_code != 200:
            # 401/403: this token is not good for userinfo (one meant for a resource server,
            # say); the claims stay missing and the answer names them.
            return claims
        info = self._json(response, "userinfo")
        if not isinstance(info, dict):
            return claims
        if info.get("sub") != claims.get("sub"):
            # OIDC Core 5.3.2: another subject's claims must never complete this one's.
            raise reject(f"userinfo sub {info.get('sub')!r} is not the token's")
        # Once asked, the display names (and groups) it has fill in the token's gaps too.
        s = self.settings
        gaps = {*missing, *(c for c in (s.first_name_claim, s.last_name_claim, s.groups_claim)
                            if claims.get(c) in (None, "", []))}
        return {**claims, **{c: info[c] for c in gaps if c in info}}

    def _user(self, claims: dict[str, Any]) -> UserInfo:
        s = self.settings
        username, email = claims.get(s.username_claim), claims.get(s.email_claim)
        if username in (None, "") or email in (None, ""):
            claim = s.username_claim if username in (None, "") else s.email_claim
            raise AuthenticationFailed(MISSING_CLAIM.format(claim=claim),
                                       log_message=f"token without a {claim!r} claim")
        if not isinstance(username, str) or len(username) > 150:
            raise reject(f"no usable {s.username_claim!r} claim")
        if not isinstance(email, str) or len(email) > 254:
            raise reject(f"{username!r} has no usable {s.email_claim!r} claim")
        if s.required_group is not None and s.required_group not in as_list(
                claims.get(s.groups_claim)):
            raise Forbidden(NOT_IN_GROUP, log_message=(
                f"{username!r} is not in group {s.required_group!r}"))
        subject = subject_of(claims, username)
        # iss was checked against the configured issuer; with none configured, the
        # introspection endpoint that vouched for the token stands for the provider.
        iss = claims.get("iss")
        issuer = iss if isinstance(iss, str) and iss else (s.issuer or s.introspection_url)
        first, last = claims.get(s.first_name_claim), claims.get(s.last_name_claim)
        return UserInfo(username=username, email=email, issuer=issuer, subject=subject,
                        # Display names only: cut to the columns' 150 rather than refuse.
                        first_name=first[:150] if isinstance(first, str) else "",
                        last_name=last[:150] if isinstance(last, str) else "")
