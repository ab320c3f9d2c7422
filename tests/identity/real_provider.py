"""panva's ``oidc-provider`` (npm, installed by ``make test`` from the committed lock file
into ``oidc_provider/``) run by Node on loopback, and the authorization-code flow with PKCE
a portal goes through to get its tokens: the provider's own login and consent pages,
submitted over HTTP (``code_flow``) or clicked in Chromium (the browser test).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

HERE = Path(__file__).parent / "oidc_provider"
NODE = shutil.which("node")
INSTALLED = (HERE / "node_modules" / "oidc-provider" / "package.json").is_file()
REDIRECT_URI = "http://127.0.0.1:65535/portal/callback"  # never fetched: the code is read off it
CLIENT_SECRET = "uws-server-" + secrets.token_urlsafe(16)
SCOPE = "openid profile email groups uws"
# Resource indicators (RFC 8707) the provider knows, each a resource server.
RESOURCES: dict[str, dict[str, Any]] = {
    "urn:uws:jwt": {"audience": "uws", "accessTokenFormat": "jwt", "profileInToken": True},
    "urn:uws:jwt-bare": {"audience": "uws", "accessTokenFormat": "jwt"},
    "urn:uws:jwt-short": {"audience": "uws", "accessTokenFormat": "jwt",
                          "accessTokenTTL": 2, "profileInToken": True},
    "urn:uws:opaque": {"audience": "uws", "accessTokenFormat": "opaque",
                       "profileInToken": True},
    "urn:other-api": {"audience": "other-api", "accessTokenFormat": "jwt",
                      "profileInToken": True},
}


def new_key() -> dict[str, Any]:
    """A private RSA JWK for the provider's key set."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(private))
    return {**jwk, "kid": f"rsa-{secrets.token_hex(4)}", "alg": "RS256", "use": "sig"}


@dataclass
class RealProvider:
    """One ``node provider.mjs`` process; ``restart`` keeps its port (and issuer)."""

    workdir: Path
    port: int
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: list[dict[str, Any]] = field(default_factory=lambda: [new_key()])
    redirect_uris: list[str] = field(default_factory=lambda: [REDIRECT_URI])
    process: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._write_accounts()
        config = self.workdir / "provider.json"
        config.write_text(json.dumps({
            "issuer": self.issuer, "port": self.port, "keys": self.keys,
            "accounts_file": str(self.workdir / "accounts.json"),
            "client_secret": CLIENT_SECRET,
            "redirect_uris": self.redirect_uris, "resources": RESOURCES}))
        config.chmod(0o600)
        assert NODE is not None
        self.process = subprocess.Popen(
            [NODE, str(HERE / "provider.mjs"), str(config)], cwd=HERE,
            stdout=subprocess.PIPE, stderr=(self.workdir / "provider.log").open("ab"))
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            log = (self.workdir / "provider.log").read_text()[-2000:]
            raise RuntimeError(f"oidc-provider did not start: {line!r}\n{log}")

    def _write_accounts(self) -> None:
        path = self.workdir / "accounts.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.accounts))
        path.with_suffix(".tmp").replace(path)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        deadline = time.monotonic() + 10
        while True:  # the port is released a moment after the exit
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def add_account(self, username: str, *, email: str | None = "", groups: list[str] | None
                    = None, account_id: str | None = None) -> str:
        """A person at the provider; returns the subject (account id) the tokens carry."""
        sub = account_id or f"acct-{secrets.token_hex(6)}"
        claims: dict[str, Any] = {"preferred_username": username, "given_name": "Rosalind",
                                  "family_name": "Franklin",
                                  "groups": groups if groups is not None else ["researchers"]}
        if email is not None:
            claims["email"] = email or f"{username}@example.org"
        self.accounts[sub] = claims
        self._write_accounts()
        return sub


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_url(issuer: str, challenge: str, state: str, resource: str | None) -> str:
    params = {"client_id": "portal", "response_type": "code", "redirect_uri": REDIRECT_URI,
              "scope": SCOPE, "code_challenge": challenge, "code_challenge_method": "S256",
              "state": state, **({"resource": resource} if resource else {})}
    return f"{issuer}/auth?{urlencode(params)}"


async def redeem(issuer: str, code: str, verifier: str, resource: str | None
                 ) -> dict[str, Any]:
    """The token endpoint's answer for an authorization code (public client + PKCE)."""
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
            "client_id": "portal", "code_verifier": verifier,
            **({"resource": resource} if resource else {})}
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(f"{issuer}/token", data=form)
    assert response.status_code == 200, response.text
    return response.json()


async def code_flow(issuer: str, sub: str, resource: str | None = "urn:uws:jwt"
                    ) -> dict[str, Any]:
    """Sign in as ``sub`` on the provider's login page, consent, and redeem the code:
    ``access_token`` and ``id_token``."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(8)
    url = authorize_url(issuer, challenge, state, resource)
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(10):
            response = await client.get(url)
            if response.status_code in (302, 303) and response.headers["location"].startswith(
                    REDIRECT_URI):
                query = parse_qs(urlsplit(response.headers["location"]).query)
                assert query["state"] == [state], query
                return await redeem(issuer, query["code"][0], verifier, resource)
            if response.status_code in (302, 303):
                url = urljoin(url, response.headers["location"])
                continue
            assert response.status_code == 200, response.text
            # An interaction page: the login form, then the consent form.
            page = response.text
            prompt = "login" if 'name="login"' in page else "consent"
            form = {"prompt": prompt, **({"login": sub, "password": "any"}
                                         if prompt == "login" else {})}
            submitted = await client.post(url, data=form)
            assert submitted.status_code in (302, 303), submitted.text
            url = urljoin(url, submitted.headers["location"])
    raise AssertionError("the authorization flow did not reach the redirect URI")


async def revoke(issuer: str, token: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(f"{issuer}/token/revocation",
                                     data={"token": token, "client_id": "portal"})
    assert response.status_code == 200, response.text
