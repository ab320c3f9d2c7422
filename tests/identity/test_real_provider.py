"""Sign-in against a certified OpenID provider: panva's ``oidc-provider`` on loopback, tokens
from the authorization-code flow with PKCE through its own login and consent pages.

The server is configured with the issuer alone (every endpoint from discovery), in JWT mode
and in introspection mode; each check of issue 19 and of the contract is made with real
tokens: valid, ID token, another API's, tampered, ``alg: none``, HMAC with the public key,
expired, revoked, wrong group, a second identity with a taken username, a rotated key,
missing claims (and userinfo filling them), and the provider down.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from controllers.auth.oidc import MISSING_CLAIM, NOT_IN_GROUP
from tests.conftest import free_port
from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.identity.conftest import (
    assert_forbidden,
    assert_refused,
    assert_taken,
    assert_works,
    build_from,
    identity_of,
    serve,
    sign_in,
    user_row,
)
from tests.identity.real_provider import (
    CLIENT_SECRET,
    HERE,
    NODE,
    REDIRECT_URI,
    RealProvider,
    authorize_url,
    code_flow,
    new_key,
    pkce_pair,
    redeem,
    revoke,
)

pytestmark = pytest.mark.skipif(
    NODE is None, reason="Node.js is missing (.ci/run installs it): no real OpenID provider")

CONFIG = "identity-real-provider.toml"
SECRET_ENV = "UWS_TEST_REAL_IDP_SECRET"
INTROSPECTION = {"mode": "introspection", "client_id": "uws-server",
                 "client_secret_env": SECRET_ENV}


def _installed() -> None:
    """``make test`` installs the provider from the lock file; a direct pytest run too."""
    if not (HERE / "node_modules" / "oidc-provider").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=HERE,
                       check=True, timeout=300)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealProvider]:
    _installed()
    provider = RealProvider(workdir=tmp_path_factory.mktemp("oidc-provider"), port=free_port())
    provider.start()
    os.environ[SECRET_ENV] = CLIENT_SECRET
    yield provider
    provider.stop()
    os.environ.pop(SECRET_ENV, None)


@pytest.fixture(autouse=True)
def idp_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that stops the provider cannot leave it stopped for the next one."""
    yield
    if "idp" in request.fixturenames:
        provider = request.getfixturevalue("idp")
        if provider.process is None:
            provider.restart()


async def _app(idp: RealProvider, settings, data_dir: Path, temporal_env, **changes
               ) -> AsyncIterator[httpx.AsyncClient]:
    from api.app import create_app

    controllers = build_from(CONFIG, idp.issuer, data_dir, **changes)
    app = create_app(settings, controllers=controllers, temporal=temporal_env.client)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        client.controllers = controllers  # type: ignore[attr-defined]
        yield client


@pytest.fixture(scope="module")
async def jwt_app(idp, settings, data_dir, temporal_env, engine
                  ) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _app(idp, settings, data_dir, temporal_env):
        yield client


@pytest.fixture(scope="module")
async def introspection_app(idp, settings, data_dir, temporal_env, engine
                            ) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _app(idp, settings, data_dir, temporal_env, **INTROSPECTION):
        yield client


def person(idp: RealProvider, **kwargs) -> tuple[str, str]:
    """A new person at the provider: (username, subject)."""
    username = f"rp{secrets.token_hex(4)}"
    return username, idp.add_account(username, **kwargs)


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# --- JWT mode ---------------------------------------------------------------------------


async def test_code_flow_token_signs_in_and_binds_issuer_and_subject(jwt_app, idp) -> None:
    name, sub = person(idp)
    tokens = await code_flow(idp.issuer, sub)
    header = jwt.get_unverified_header(tokens["access_token"])
    assert header["typ"].lower() == "at+jwt"  # the provider's RFC 9068 access token
    key = await assert_works(jwt_app, tokens["access_token"])
    assert await user_row(name) == {"username": name, "email": f"{name}@example.org",
                                    "first_name": "Rosalind", "last_name": "Franklin"}
    assert await identity_of(name) == [{"issuer": idp.issuer, "subject": sub}]
    # Another sign-in of the same person: the same account and key.
    again = await code_flow(idp.issuer, sub)
    assert await assert_works(jwt_app, again["access_token"]) == key


async def test_id_token_and_another_apis_token_are_refused(jwt_app, idp) -> None:
    _, sub = person(idp)
    tokens = await code_flow(idp.issuer, sub)
    await assert_refused(jwt_app, tokens["id_token"])  # aud is the portal, typ is JWT
    other = await code_flow(idp.issuer, sub, resource="urn:other-api")
    assert jwt.decode(other["access_token"], options={"verify_signature": False}
                      )["aud"] == "other-api"
    await assert_refused(jwt_app, other["access_token"])


async def test_forged_and_broken_tokens_are_refused(jwt_app, idp) -> None:
    _, sub = person(idp)
    token = (await code_flow(idp.issuer, sub))["access_token"]
    header, payload, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    # Tampered: another subject under the provider's signature.
    await assert_refused(jwt_app, f"{header}.{b64({**claims, 'sub': 'root'})}.{signature}")
    # alg none, unsigned.
    await assert_refused(jwt_app, f"{b64({'alg': 'none', 'typ': 'at+jwt'})}.{payload}.")
    # HS256 keyed with the provider's public key (the classic confusion attack).
    public = json.dumps({k: idp.keys[0][k] for k in ("kty", "n", "e")}).encode()
    head = b64({"alg": "HS256", "typ": "at+jwt", "kid": idp.keys[0]["kid"]})
    mac = hmac.new(public, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    await assert_refused(jwt_app, f"{head}.{payload}."
                         + base64.urlsafe_b64encode(mac).rstrip(b"=").decode())
    await assert_refused(jwt_app, "not-a-token-at-all")


async def test_expired_token_is_refused(jwt_app, idp) -> None:
    _, sub = person(idp)
    token = (await code_flow(idp.issuer, sub, resource="urn:uws:jwt-short"))["access_token"]
    await assert_works(jwt_app, token)
    await asyncio.sleep(2 + 1 + 0.5)  # its 2 s lifetime and the configured 1 s leeway
    await assert_refused(jwt_app, token)


async def test_wrong_group_is_403(jwt_app, idp) -> None:
    _, sub = person(idp, groups=["visitors"])
    token = (await code_flow(idp.issuer, sub))["access_token"]
    await assert_forbidden(jwt_app, token, NOT_IN_GROUP)


async def test_second_identity_with_a_taken_username_gets_409(jwt_app, idp) -> None:
    name, sub = person(idp)
    key = await assert_works(jwt_app, (await code_flow(idp.issuer, sub))["access_token"])
    # Another person at the same provider calls themselves the same.
    impostor = idp.add_account(name, email="mallory@example.org")
    await assert_taken(jwt_app, (await code_flow(idp.issuer, impostor))["access_token"], name)
    row = await user_row(name)
    assert row is not None and row["email"] == f"{name}@example.org"  # not overwritten
    assert await assert_works(jwt_app, (await code_flow(idp.issuer, sub))["access_token"]
                              ) == key


async def test_a_rotated_signing_key_is_picked_up_at_once(jwt_app, idp) -> None:
    _, sub = person(idp)
    await assert_works(jwt_app, (await code_flow(idp.issuer, sub))["access_token"])
    old_kid = idp.keys[0]["kid"]
    idp.keys.insert(0, new_key())  # the new key signs; the old one is still published
    idp.restart()
    await asyncio.sleep(0.6)  # past jwks_min_refetch_seconds of the last fetch
    token = (await code_flow(idp.issuer, sub))["access_token"]
    assert jwt.get_unverified_header(token)["kid"] not in (None, old_kid)
    await assert_works(jwt_app, token)


async def test_a_token_without_profile_claims_names_what_is_missing(jwt_app, idp) -> None:
    # This provider's JWT access tokens for a resource server carry only sub, and its
    # userinfo refuses them (their audience is the API): the answer names the claim.
    _, sub = person(idp)
    token = (await code_flow(idp.issuer, sub, resource="urn:uws:jwt-bare"))["access_token"]
    assert "preferred_username" not in jwt.decode(token, options={"verify_signature": False})
    r = await sign_in(jwt_app, token)
    assert r.status_code == 401
    assert r.json() == {"success": False,
                        "message": MISSING_CLAIM.format(claim="preferred_username")}


async def test_provider_down_is_503_and_shows_in_status(jwt_app, idp) -> None:
    _, sub = person(idp)
    token = (await code_flow(idp.issuer, sub))["access_token"]
    status = (await jwt_app.get("/status/")).json()["dependencies"]
    assert status["api_user_authentication"]["connected"] is True
    # A token signed with a key rotated in while the provider is down (re-signed here: the
    # provider cannot issue while stopped): its key must be fetched, and cannot be.
    idp.keys.insert(0, new_key())
    idp.stop()
    await asyncio.sleep(0.6)
    r = await sign_in(jwt_app, (await _token_signed_with(idp, idp.keys[0], token)))
    assert r.status_code == 503, r.text
    assert "token" not in r.json()
    await asyncio.sleep(5.1)  # past the health cache
    status = (await jwt_app.get("/status/")).json()["dependencies"]
    assert status["api_user_authentication"]["connected"] is False


async def _token_signed_with(idp: RealProvider, key: dict, token: str) -> str:
    """``token``'s claims re-signed with ``key`` (a key the running server has not seen)."""
    claims = jwt.decode(token, options={"verify_signature": False})
    private = jwt.PyJWK(key).key
    return jwt.encode(claims, private, algorithm="RS256",
                      headers={"kid": key["kid"], "typ": "at+jwt"})


# --- introspection mode -----------------------------------------------------------------


async def test_opaque_token_signs_in_and_revocation_is_honoured(introspection_app, idp
                                                                ) -> None:
    name, sub = person(idp)
    token = (await code_flow(idp.issuer, sub, resource="urn:uws:opaque"))["access_token"]
    assert token.count(".") == 0  # opaque: only introspection can tell what it is
    await assert_works(introspection_app, token)
    assert await identity_of(name) == [{"issuer": idp.issuer, "subject": sub}]
    await revoke(idp.issuer, token)
    await assert_refused(introspection_app, token)  # cache_seconds = 0: at once


async def test_introspection_refuses_jwts_and_other_audiences(introspection_app, idp
                                                              ) -> None:
    _, sub = person(idp)
    # A JWT access token is no token this provider's introspection knows: 401, not 500.
    await assert_refused(introspection_app,
                         (await code_flow(idp.issuer, sub))["access_token"])
    # An opaque token meant for the portal alone (no resource: no aud): not for us.
    await assert_refused(introspection_app,
                         (await code_flow(idp.issuer, sub, resource=None))["access_token"])
    await assert_refused(introspection_app, "garbage")


async def test_userinfo_completes_a_token_that_names_no_one(idp, settings, data_dir,
                                                           temporal_env, engine) -> None:
    # A provider that sets no aud: the client_id is accepted as the audience where the
    # operator says so, and the profile comes from userinfo, called with the token.
    name, sub = person(idp)
    token = (await code_flow(idp.issuer, sub, resource=None))["access_token"]
    async for client in _app(idp, settings, data_dir, temporal_env, **INTROSPECTION,
                             audience=["portal"], accept_client_id_as_audience=True):
        await assert_works(client, token)
        assert (await user_row(name))["email"] == f"{name}@example.org"
    # Without userinfo the same token names nobody, and the answer says which claim.
    async for client in _app(idp, settings, data_dir, temporal_env, **INTROSPECTION,
                             audience=["portal"], accept_client_id_as_audience=True,
                             use_userinfo=False):
        r = await sign_in(client, token)
        assert r.status_code == 401
        assert r.json()["message"] == MISSING_CLAIM.format(claim="preferred_username")


async def test_introspection_health(introspection_app, idp) -> None:
    status = (await introspection_app.get("/status/")).json()["dependencies"]
    assert status["api_user_authentication"]["connected"] is True


async def test_introspection_with_the_provider_down_is_503(introspection_app, idp) -> None:
    _, sub = person(idp)
    token = (await code_flow(idp.issuer, sub, resource="urn:uws:opaque"))["access_token"]
    idp.stop()
    r = await sign_in(introspection_app, token)
    assert r.status_code == 503, r.text
    assert "token" not in r.json()


# --- the same flow in a browser ---------------------------------------------------------


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
async def test_sign_in_through_the_providers_pages_in_chromium(jwt_app, idp) -> None:
    from playwright.async_api import async_playwright

    name, sub = person(idp)
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(8)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            # The portal's callback: the browser is sent there with the code, read it off.
            landed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

            async def callback(route) -> None:
                if not landed.done():
                    landed.set_result(route.request.url)
                await route.fulfill(status=200, body="signed in")
            await page.route(f"{REDIRECT_URI}**", callback)
            await page.route("https://fonts.googleapis.com/**", lambda route: route.abort())
            await page.goto(authorize_url(idp.issuer, challenge, state, "urn:uws:jwt"))
            await page.fill("input[name=login]", sub)
            await page.fill("input[name=password]", "any password")
            await page.click("button[type=submit]")
            await page.click("button:has-text('Continue')")  # the consent page
            query = parse_qs(urlsplit(await asyncio.wait_for(landed, 30)).query)
        finally:
            await browser.close()
    assert query["state"] == [state]
    tokens = await redeem(idp.issuer, query["code"][0], verifier, "urn:uws:jwt")
    await assert_works(jwt_app, tokens["access_token"])
    assert await identity_of(name) == [{"issuer": idp.issuer, "subject": sub}]
