"""The researchers' page (``/ui/``) end to end in headless Chromium: sign in with a link
from ``uws login-link``, create a workspace with a file, start a JupyterLab and watch it
come up without reloading, open it and run ``print(6*7)``, stop it and read why it ended,
share with a second user who accepts, a refused start showing the server's message; a
second user's browser never sees the first's workspaces, and a request that carries the
cookie without the CSRF token is refused.

``UWS_UI_SCREENSHOTS=docs/screenshots`` saves the main pages as the README shows them.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_CONFIG, TESTS
from tests.e2e.test_browser import CHROMIUM, print_6_times_7

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: "
                       "`apt-get install chromium` (as .ci/run does) to run the page tests"),
]
SHOTS = os.environ.get("UWS_UI_SCREENSHOTS")


def login_link(settings, server_url: str, username: str) -> str:
    """``uws login-link`` as an administrator runs it (the user is created if new)."""
    env = {**os.environ, "UWS_DATABASE_URL": settings.database_url,
           "UWS_CONFIG": str(TEST_CONFIG), "UWS_DATA_DIR": str(settings.data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "login-link", username, "--email",
         f"{username}@example.org", "--base-url", server_url],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(re.escape(server_url) + r"/ui/login/\?ticket=[\w-]+", link), link
    return link


async def signed_in_page(browser, settings, server_url: str, username: str):
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(60_000)
    await page.goto(login_link(settings, server_url, username))
    await page.wait_for_selector(f".who:text-is('{username}')")
    return context, page


async def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


async def create_workspace(page, name: str, file: Path) -> None:
    await page.click("#create summary")
    await page.fill("#create-form input[name=name]", name)
    await page.fill("#create-form input[name=description]", "made in the browser")
    await page.set_input_files("#create-form input[name=files]", str(file))
    await page.click("#create-form button[type=submit]")
    await page.wait_for_selector(f"#workspaces a:text-is('{name}')")


async def test_sign_in_workspace_session_stop_and_share(
        browser, settings, server_url, tmp_path) -> None:
    alice, bob = f"alice{secrets.token_hex(3)}", f"bob{secrets.token_hex(3)}"
    context, page = await signed_in_page(browser, settings, server_url, alice)
    # A link works once.
    link = login_link(settings, server_url, alice)
    await page.goto(link)
    again = await (await browser.new_context()).new_page()
    response = await again.goto(link)
    assert response is not None and response.status == 400
    assert "invalid, already used or expired" in await again.content()

    # The page's weight: everything the home page loads (documents, script, style, the
    # API's answers), as Chromium received it.
    sizes: dict[str, int] = {}

    async def count(response) -> None:
        if response.request.resource_type in ("document", "script", "stylesheet", "fetch"):
            sizes[response.url] = len(await response.body())
    page.on("response", count)
    await page.reload()
    await page.wait_for_selector("#quota-disk")
    await page.wait_for_timeout(300)
    page.remove_listener("response", count)
    print(f"\nhome page weight: {sum(sizes.values())} bytes in {len(sizes)} responses")

    data = tmp_path / "notes.txt"
    data.write_text("observations\n")
    name = f"thesis-{secrets.token_hex(2)}"
    await create_workspace(page, name, data)
    await shot(page, "home")

    await page.click(f"#workspaces a:text-is('{name}')")
    await page.wait_for_selector("#files li:text-is('/notes.txt')")
    await page.select_option("#job-type", "jupyter_lab")
    await page.fill("#param-memory_mb", "4096")
    await shot(page, "workspace")
    started = time.monotonic()
    await page.click("#start-form button[type=submit]")
    await page.wait_for_url(re.compile(r".*/ui/jobs/\d+/$"))
    await page.evaluate("window.uwsNoReload = true")
    await page.wait_for_selector("#job-status .status-pending, #job-status .status-running")
    await page.wait_for_selector("#open:not([hidden])", timeout=120_000)
    start_to_open = time.monotonic() - started
    print(f"\nStart -> Open on the page: {start_to_open:.2f} s")
    # Pending to running arrived over the socket: the page was never reloaded.
    assert await page.evaluate("window.uwsNoReload") is True
    assert await page.locator("#job-status").inner_text() == "running"
    assert re.fullmatch(r"\d+:\d\d:\d\d", await page.locator("#time-left").inner_text())
    await shot(page, "job")

    lab = await context.new_page()
    try:
        assert await print_6_times_7(lab, await page.locator("#open").get_attribute("href")) == "42"
    except Exception:
        await lab.screenshot(path="/tmp/lab.png")
        print("LABURL", lab.url)
        raise
    await lab.close()

    before = await page.locator("#time-left").inner_text()
    await page.fill("#extend-form input[name=minutes]", "15")
    await page.click("#extend-form button")
    await page.wait_for_selector("#flash.ok:has-text('Extended')")
    assert await page.locator("#time-left").inner_text() > before  # h:mm:ss, same width

    await page.click("#stop")
    await page.wait_for_selector("#flash.ok:text-is('Job queued to stop.')")
    await page.wait_for_selector("#job-status .status-complete, #job-status .status-failed",
                                 timeout=90_000)
    await page.wait_for_selector("#timeline li:has-text('stop')")
    assert not await page.locator("#open").is_visible()  # the session is gone
    await shot(page, "job-ended")

    # Bob, in his own browser: Alice's workspace is not his to see.
    bob_context, bob_page = await signed_in_page(browser, settings, server_url, bob)
    await bob_page.wait_for_selector("#workspaces td:text-is('No workspaces yet.')")
    assert name not in await bob_page.content()
    workspace_id = re.search(r"/ui/workspaces/(\d+)/", await page.locator("#back")
                             .get_attribute("href")).group(1)
    await bob_page.goto(f"{server_url}/ui/workspaces/{workspace_id}/")
    await bob_page.wait_for_selector(f"#flash:text-is('Workspace {workspace_id} not found.')")
    assert name not in await bob_page.content()

    # Alice shares a copy with Bob, found by his e-mail; Bob accepts it.
    await page.goto(f"{server_url}/ui/workspaces/{workspace_id}/")
    await page.fill("#share-search input[name=search]", f"{bob}@example")
    await page.click("#share-search button")
    await page.click(f"#share-results li:has-text('{bob}') button")
    await page.wait_for_selector("#flash.ok:has-text('Shared with')")
    await bob_page.goto(f"{server_url}/ui/")
    accept = bob_page.locator(f"#shares-in li:has-text('{name}') button:text-is('Accept')")
    await accept.click()
    await bob_page.wait_for_selector(f"#workspaces a:text-is('{name}')")
    await shot(bob_page, "shared")
    await page.goto(f"{server_url}/ui/")
    await page.wait_for_selector(f"#shares-out li:has-text('{name}') .hint:text-is('accepted')")

    # Signing out ends the session: the cookie no longer opens the page.
    await bob_page.click("#sign-out")
    await bob_page.wait_for_selector("h1:text-is('Sign in')")
    await bob_context.close()
    await context.close()


async def test_refused_starts_show_the_servers_message(browser, settings, server_url) -> None:
    from db import quotas
    from db.accounts import user_id_named

    user = f"carol{secrets.token_hex(3)}"
    context, page = await signed_in_page(browser, settings, server_url, user)
    await page.click("#create summary")
    await page.fill("#create-form input[name=name]", "refusals")
    await page.click("#create-form button[type=submit]")
    await page.click("#workspaces a:text-is('refusals')")
    await page.wait_for_selector("#param-num_cpus")
    await page.select_option("#job-type", "local_test_job")
    await page.fill("#param-num_cpus", "0")
    await page.click("#start-form button[type=submit]")
    await page.wait_for_selector("#flash.error:has-text('Invalid resource options found')")
    assert "num_cpus: Value '0' not above minimum of 1." in await page.locator(
        "#flash").inner_text()

    await quotas.set_quota(await user_id_named(user), max_core_hours=0.01)
    await page.fill("#param-num_cpus", "1")
    await page.click("#start-form button[type=submit]")
    await page.wait_for_selector("#flash.error:has-text('core-hour')")
    await context.close()


async def test_cookie_without_csrf_token_is_refused(browser, settings, server_url) -> None:
    user = f"dave{secrets.token_hex(3)}"
    context, page = await signed_in_page(browser, settings, server_url, user)
    cookies = {c["name"]: c["value"] for c in await context.cookies()}
    assert "uws_browser" in cookies
    cookie = next(c for c in await context.cookies() if c["name"] == "uws_browser")
    assert cookie["httpOnly"] is True
    assert await page.evaluate("document.cookie.includes('uws_browser')") is False
    # A request from the page that leaves out the token the page was rendered with is
    # refused; with it, it passes.
    post = ("([body, token]) => fetch('/workspaces/', {method: 'POST', body, headers: "
            "token ? {'Content-Type': 'application/json', 'X-UWS-CSRF': token} "
            ": {'Content-Type': 'application/json'}}).then(r => r.status)")
    token = await page.locator('meta[name="uws-csrf"]').get_attribute("content")
    assert await page.evaluate(post, ['{"name": "forged", "description": "x"}', ""]) == 403
    assert await page.evaluate(post, ['{"name": "mine", "description": "x"}', token]) == 200
    body = '{"name": "forged", "description": "x"}'
    # A forged request riding on the cookie alone cannot, nor one with a wrong token.
    async with httpx.AsyncClient(base_url=server_url, cookies=cookies) as forger:
        r = await forger.post("/workspaces/", content=body,
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 403
        assert r.json() == {"success": False, "message": "CSRF token missing or incorrect."}
        r = await forger.post("/workspaces/", content=body, headers={
            "Content-Type": "application/json", "X-UWS-CSRF": "x" * 43})
        assert r.status_code == 403
        # Reading with the cookie works (a GET changes nothing).
        r = await forger.get("/workspaces/")
        assert r.status_code == 200
        listed = [w["name"] for w in r.json()["data"]["workspaces"]]
        assert "forged" not in listed
        # A WebSocket from another origin does not get the user either.
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        url = server_url.replace("http", "ws") + "/jobs/"
        async with connect(url, origin="http://evil.example",
                           additional_headers={"Cookie": f"uws_browser={cookies['uws_browser']}"}
                           ) as socket:
            with pytest.raises(ConnectionClosed) as closed:
                await socket.recv()
            assert closed.value.rcvd.code == 4401
    await context.close()
