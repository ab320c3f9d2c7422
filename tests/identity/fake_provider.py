"""A small identity provider on loopback that speaks the real protocols.

- ``POST /oauth2/introspect``: RFC 7662 introspection, client authentication by HTTP basic
  or by ``client_id``/``client_secret`` in the form (RFC 6749 2.3.1); an unknown, expired or
  revoked token is ``{"active": false}`` and nothing else.
- ``GET /jwks``: the public signing keys (RSA and EC) as a JWK Set (RFC 7517).
- ``GET /.well-known/openid-configuration``: OIDC Discovery metadata naming the endpoints
  (``discovery`` replaces or adds fields, e.g. another ``issuer``).
- ``GET /userinfo``: OIDC userinfo for a bearer access token (opaque, or a JWT of ours):
  the ``sub`` and what ``profiles`` holds for it (``userinfo_sub`` overrides the sub).
- ``POST /v2/oauth2/token/introspect``: Globus Auth's introspection (basic client auth,
  ``include=identity_set``), answering Globus's fields.
- ``GET /v2/groups/my_groups``: the Globus Groups API, the caller's groups with
  ``my_memberships``, authorised by the user's bearer token.
- ``GET /v2/oauth2/authorize`` and ``POST /v2/oauth2/token``: Globus Auth's authorization
  code flow with PKCE (S256): the identity in ``signs_in`` "logs in" at once and is sent
  back with a code; the code (once, with its verifier, redirect URI and our client's basic
  credentials) is worth an auth.globus.org token and, in ``other_tokens``, a Groups token.

Tokens are opaque (introspection) or JWTs signed with the provider's keys (PyJWT), access
tokens typed ``at+jwt`` (RFC 9068) unless the headers say otherwise (an ID token: ``JWT``).
``fail_with`` makes every endpoint answer that status, as a provider in trouble does;
``unknown_token_answer`` makes the introspections answer a token they do not know with that
status and body (some providers' ``400 invalid_token``) rather than ``{"active": false}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

Receive = Any
Send = Any


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        maker = RSAAlgorithm if self.alg.startswith("RS") else ECAlgorithm
        jwk = json.loads(maker.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class FakeProvider:
    issuer: str = ""  # set once the port is known
    clients: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    # group id -> {identity id: membership status}
    groups: dict[str, dict[str, str]] = field(default_factory=dict)
    rsa: SigningKey = field(default_factory=lambda: rsa_key("rsa-1"))
    ec: SigningKey = field(default_factory=lambda: ec_key("ec-1"))
    published: list[SigningKey] = field(default_factory=list)
    fail_with: int | None = None
    unknown_token_answer: tuple[int, dict[str, Any]] | None = None
    hits: dict[str, int] = field(default_factory=dict)
    # sub -> the claims userinfo answers for it
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    discovery: dict[str, Any] = field(default_factory=dict)
    userinfo_sub: str | None = None
    # The claims of whoever signs in at the authorize endpoint next; code -> its grant
    signs_in: dict[str, Any] | None = None
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.published = self.published or [self.rsa, self.ec]

    # --- issuing ------------------------------------------------------------------------

    def issue(self, claims: dict[str, Any], lifetime: float = 3600) -> str:
        """An opaque access token carrying ``claims`` (``exp``/``iat`` added)."""
        token = secrets.token_urlsafe(32)
        now = int(time.time())
        self.tokens[token] = {"iat": now, "exp": int(now + lifetime), **claims}
        return token

    def revoke(self, token: str) -> None:
        self.revoked.add(token)

    def sign(self, claims: dict[str, Any], key: SigningKey, lifetime: float = 3600,
             headers: dict[str, Any] | None = None) -> str:
        now = int(time.time())
        payload = {"iss": self.issuer, "iat": now, "nbf": now, "exp": int(now + lifetime),
                   **claims}
        return jwt.encode(payload, key.private, algorithm=key.alg,
                          headers={"kid": key.kid, "typ": "at+jwt", **(headers or {})})

    def _active(self, token: str) -> dict[str, Any] | None:
        claims = self.tokens.get(token)
        if claims is None or token in self.revoked or claims["exp"] <= time.time():
            return None
        return claims

    # --- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        route = (scope["method"], scope["path"])
        self.hits[scope["path"]] = self.hits.get(scope["path"], 0) + 1
        if self.fail_with is not None:
            status, answer = self.fail_with, {"error": "temporarily_unavailable"}
        elif route == ("GET", "/.well-known/openid-configuration"):
            status, answer = 200, self._metadata()
        elif route == ("GET", "/userinfo"):
            status, answer = self._userinfo(headers)
        elif route == ("GET", "/jwks"):
            status, answer = 200, {"keys": [k.public_jwk() for k in self.published]}
        elif route == ("POST", "/oauth2/introspect"):
            status, answer = self._introspect(headers, _form(body))
        elif route == ("POST", "/v2/oauth2/token/introspect"):
            status, answer = self._globus_introspect(headers, _form(body))
        elif route == ("GET", "/v2/groups/my_groups"):
            status, answer = self._my_groups(headers)
        elif route == ("GET", "/v2/oauth2/authorize"):
            await self._authorize(_form(scope.get("query_string", b"")), send)
            return
        elif route == ("POST", "/v2/oauth2/token"):
            status, answer = self._redeem(headers, _form(body))
        else:
            status, answer = 404, {"error": "not_found"}
        extra = [(b"www-authenticate", b'Basic realm="idp"')] if status == 401 else []
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    def _metadata(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks",
                "introspection_endpoint": f"{self.issuer}/oauth2/introspect",
                "userinfo_endpoint": f"{self.issuer}/userinfo",
                "token_endpoint": f"{self.issuer}/oauth2/token",
                "response_types_supported": ["code"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                **self.discovery}

    def _bearer_claims(self, headers: dict[str, str]) -> dict[str, Any] | None:
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        token = auth[7:]
        claims = self._active(token)
        if claims is not None:
            return claims
        for key in self.published:
            try:
                return jwt.decode(token, key.private.public_key(), algorithms=[key.alg],
                                  options={"verify_aud": False})
            except jwt.PyJWTError:
                continue
        return None

    def _userinfo(self, headers: dict[str, str]) -> tuple[int, Any]:
        claims = self._bearer_claims(headers)
        if claims is None:
            return 401, {"error": "invalid_token"}
        sub = claims["sub"]
        return 200, {**self.profiles.get(sub, {}), "sub": self.userinfo_sub or sub}

    def _client_ok(self, headers: dict[str, str], form: dict[str, str],
                   allow_post: bool) -> bool:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return False
        elif allow_post:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        else:
            return False
        return bool(client_id) and self.clients.get(client_id) == secret

    def _introspect(self, headers: dict[str, str], form: dict[str, str]) -> tuple[int, Any]:
        if not self._client_ok(headers, form, allow_post=True):
            return 401, {"error": "invalid_client"}
        claims = self._active(form.get("token", ""))
        if claims is None:
            return self.unknown_token_answer or (200, {"active": False})
        return 200, {"active": True, "token_type": "Bearer", **claims}

    def _globus_introspect(self, headers: dict[str, str], form: dict[str, str]
                           ) -> tuple[int, Any]:
        if not self._client_ok(headers, form, allow_post=False):
            return 401, {"errors": [{"code": "UNAUTHORIZED", "status": "401"}]}
        claims = self._active(form.get("token", ""))
        if claims is None:
            return self.unknown_token_answer or (200, {"active": False})
        answer = {"active": True, "token_type": "Bearer", "iss": "https://auth.globus.org",
                  "nbf": claims["iat"],
                  **{k: v for k, v in claims.items() if k != "identity_set"}}
        if "identity_set" in form.get("include", "").split(","):
            answer["identity_set"] = claims.get("identity_set", [claims["sub"]])
        return 200, answer

    async def _authorize(self, query: dict[str, str], send: Send) -> None:
        redirect = query.get("redirect_uri", "")
        if (query.get("client_id") not in self.clients or query.get("response_type") != "code"
                or query.get("code_challenge_method") != "S256" or self.signs_in is None
                or not redirect):
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"bad authorization request"})
            return
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"claims": self.signs_in, "redirect_uri": redirect,
                            "challenge": query.get("code_challenge", ""),
                            "client_id": query["client_id"]}
        location = f"{redirect}?{urlencode({'code': code, 'state': query.get('state', '')})}"
        await send({"type": "http.response.start", "status": 302,
                    "headers": [(b"location", location.encode())]})
        await send({"type": "http.response.body", "body": b""})

    def _redeem(self, headers: dict[str, str], form: dict[str, str]) -> tuple[int, Any]:
        if not self._client_ok(headers, form, allow_post=False):
            return 401, {"error": "invalid_client"}
        grant = self.codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if (grant is None or form.get("grant_type") != "authorization_code"
                or grant["redirect_uri"] != form.get("redirect_uri")
                or digest.rstrip(b"=").decode() != grant["challenge"]):
            return 400, {"error": "invalid_grant"}
        claims = grant["claims"]
        auth_token = self.issue({**claims, "aud": ["auth.globus.org"]})
        groups_token = self.issue({**claims, "aud": ["groups.api.globus.org",
                                                     grant["client_id"]]})
        return 200, {"access_token": auth_token, "resource_server": "auth.globus.org",
                     "token_type": "Bearer", "expires_in": 3600,
                     "other_tokens": [{"access_token": groups_token, "token_type": "Bearer",
                                       "resource_server": "groups.api.globus.org",
                                       "expires_in": 3600}]}

    def _my_groups(self, headers: dict[str, str]) -> tuple[int, Any]:
        auth = headers.get("authorization", "")
        claims = self._active(auth[7:]) if auth.lower().startswith("bearer ") else None
        if claims is None:
            return 401, {"code": "AUTHENTICATION_ERROR", "detail": "Token is invalid"}
        identities = claims.get("identity_set", [claims["sub"]])
        answer = []
        for group_id, members in self.groups.items():
            mine = [{"group_id": group_id, "identity_id": ident, "username": claims["username"],
                     "role": "member", "status": status}
                    for ident, status in members.items() if ident in identities]
            if mine:
                answer.append({"id": group_id, "name": f"group {group_id[:8]}",
                               "group_type": "regular", "my_memberships": mine})
        return 200, answer


def _form(body: bytes) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(body.decode()).items()}
