"""The page's sign-in through an OpenID provider: "Sign in with …" sends the browser to
panva's ``oidc-provider`` (authorization code + PKCE, its own login and consent pages), and
the way back makes the same account ``POST /tokens/`` would and a session cookie."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.identity.conftest import build_from, identity_of, serve
from tests.identity.real_provider import NODE
from tests.identity.test_real_provider import CONFIG, idp  # noqa: F401 (the fixture)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or NODE is None,
                       reason="needs Chromium and Node.js (.ci/run installs both)"),
]
WEB = {"web_client_id": "portal", "web_resource": "urn:uws:jwt",
       "web_scope": "openid profile email groups uws"}


@pytest.fixture(scope="module")
async def page_server(idp, settings, data_dir, temporal_env, engine  # noqa: F811
                      ) -> AsyncIterator[str]:
    from api.app import create_app

    controllers = build_from(CONFIG, idp.issuer, data_dir, **WEB)
    app = create_app(settings, controllers=controllers, temporal=temporal_env.client)
    async with serve(app) as url:
        # The portal client may come back to this page's callback only (exact match).
        idp.redirect_uris.append(f"{url}/ui/login/callback/")
        idp.restart()
        yield url


async def test_provider_sign_in_in_chromium(page_server, idp) -> None:  # noqa: F811
    from playwright.async_api import async_playwright

    name = f"web{secrets.token_hex(3)}"
    sub = idp.add_account(name)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.set_default_timeout(30_000)
            await page.route("https://fonts.googleapis.com/**", lambda route: route.abort())
            await page.goto(f"{page_server}/ui/")
            await page.click("a:has-text('Sign in with')")
            await page.fill("input[name=login]", sub)
            await page.fill("input[name=password]", "any password")
            await page.click("button[type=submit]")
            await page.click("button:has-text('Continue')")
            await page.wait_for_selector(f".who:text-is('{name}')")
            await page.wait_for_selector("#workspaces td:text-is('No workspaces yet.')")
            # The same binding as /tokens/: (issuer, subject), never the username alone.
            assert await identity_of(name) == [{"issuer": idp.issuer, "subject": sub}]
        finally:
            await browser.close()


async def test_callback_without_the_flow_cookie_is_refused(page_server) -> None:
    # A code arriving without the state this browser was sent off with (login CSRF, or a
    # replayed link) signs nobody in.
    async with httpx.AsyncClient(base_url=page_server) as client:
        r = await client.get("/ui/login/callback/", params={"code": "x", "state": "y"})
    assert r.status_code == 400
    assert "did not complete" in r.text
    assert "uws_browser" not in r.headers.get("set-cookie", "")
