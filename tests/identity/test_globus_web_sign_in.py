"""The web page's "Sign in with Globus": the authorization-code flow with PKCE against the
loopback provider's Globus Auth endpoints, the Groups token it returns checked as ``POST
/tokens/`` checks one, and a session cookie at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from controllers.auth.globus import NOT_IN_GROUPS
from tests.identity.conftest import build_from, identity_of, serve
from tests.identity.test_globus import globus_token


@pytest.fixture(scope="module")
async def globus_page(provider, settings, data_dir, temporal_env, engine, mapped_os_user
                      ) -> AsyncIterator[str]:
    from api.app import create_app

    controllers = build_from("identity-globus.toml", provider.issuer, data_dir,
                             web_sign_in=True)
    app = create_app(settings, controllers=controllers, temporal=temporal_env.client)
    async with serve(app) as url:
        yield url


def signing_in(provider, username: str, **overrides) -> None:
    """The identity the provider's authorize endpoint logs in next (a Groups token's)."""
    token = globus_token(provider, username, **overrides)
    provider.signs_in = {k: v for k, v in provider.tokens[token].items()
                         if k not in ("iat", "exp", "aud")}


async def test_sign_in_with_globus(globus_page, provider) -> None:
    signing_in(provider, "carol@uni.edu")
    async with httpx.AsyncClient(base_url=globus_page, follow_redirects=True) as browser:
        page = await browser.get("/ui/login/provider/")
        assert page.status_code == 200, page.text
        assert str(page.url) == f"{globus_page}/ui/"
        assert "carol@uni.edu" in page.text  # signed in: the header names the user
        assert "uws_browser" in browser.cookies
        listed = await browser.get("/workspaces/")
        assert listed.status_code == 200 and listed.json()["success"] is True
    identity = await identity_of("carol@uni.edu")
    assert identity == [{"issuer": "https://auth.globus.org",
                         "subject": provider.signs_in["sub"]}]


async def test_outside_the_groups_is_refused_on_the_page(globus_page, provider) -> None:
    signing_in(provider, "carol@uni.edu", member="pending")
    async with httpx.AsyncClient(base_url=globus_page, follow_redirects=True) as browser:
        page = await browser.get("/ui/login/provider/")
        assert page.status_code == 403
        assert NOT_IN_GROUPS in page.text
        assert "uws_browser" not in browser.cookies


async def test_a_code_is_worth_one_sign_in(globus_page, provider) -> None:
    signing_in(provider, "carol@uni.edu")
    async with httpx.AsyncClient(base_url=globus_page) as browser:
        to_globus = await browser.get("/ui/login/provider/")
        back = await browser.get(to_globus.headers["location"])
        callback = back.headers["location"].removeprefix(globus_page)
        assert (await browser.get(callback)).status_code == 303  # signed in
        # The same code again: its flow cookie is spent with it, and so is the code.
        again = await browser.get(callback)
        assert again.status_code == 400 and "did not complete" in again.text
