"""The whole product in a real browser: a user starts JupyterLab, opens its link in
headless Chromium (Debian's package, driven by Playwright; nothing is downloaded), creates
a notebook, runs ``print(6*7)`` in a kernel and sees 42, through our passthrough. Another
user opening the same link is refused, and so is the owner once the job has stopped."""

from __future__ import annotations

import shutil

import pytest
from playwright.async_api import TimeoutError as PlaywrightTimeout

from tests.api.test_jobs import wait_status
from tests.conftest import make_user_token
from tests.e2e.test_jupyter_lab import start_lab

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: "
                       "`apt-get install chromium` (as .ci/run does) to run the browser test"),
]


async def print_6_times_7(page, link: str) -> str:
    """Open a session's link, make a notebook, run ``print(6*7)``; the cell's output."""
    page.set_default_timeout(90_000)
    await page.goto(link)
    await page.wait_for_selector(".jp-LauncherCard")
    await page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
    editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    await editor.wait_for()
    # The kernel must be up before the cell runs; its status reads "Idle" then.
    await page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    await editor.click()
    await page.keyboard.type("print(6*7)")
    output = page.locator(".jp-OutputArea-output").first
    # JupyterLab accepts the keystroke before its kernel connection is wired up and then
    # drops the run; run the cell again (in place) until it has run.
    for _ in range(6):
        await page.keyboard.press("Control+Enter")
        try:
            await output.wait_for(timeout=10_000)
            break
        except PlaywrightTimeout:
            continue
    return (await output.inner_text()).strip()


async def test_notebook_runs_in_the_browser_through_the_passthrough(
    client, auth, server_url, api_client_key, browser
) -> None:
    job_id, details = await start_lab(client, auth)
    # What a portal does: url_domain + url_path (url_domain: the address this client used).
    connection = details["connection_details"]
    assert connection["url_domain"] == server_url
    link = connection["url_domain"] + connection["url_path"]

    owner = await browser.new_context()
    page = await owner.new_page()
    assert await print_6_times_7(page, link) == "42"

    # Someone else with the same link: the ticket was spent, and they have no cookie.
    stranger = await browser.new_context()
    other_page = await stranger.new_page()
    response = await other_page.goto(link)
    assert response is not None and response.status == 403
    assert "already used" in await other_page.content()
    # Even signed in to the API as themselves, it is not their session.
    other_token = await make_user_token(client, api_client_key)
    await stranger.set_extra_http_headers({"UWS-Authorization": f"Token {other_token}"})
    response = await other_page.goto(link.split("?")[0])
    assert response is not None and response.status == 404
    await stranger.close()

    r = await client.put(f"/jobs/{job_id}/stop/", headers=auth)
    assert r.status_code == 200
    await wait_status(client, auth, job_id, "complete", "failed", timeout=60)
    # The owner's browser still holds its cookie: the session is refused, saying why.
    response = await page.goto(link.split("&uws_ticket=")[0])
    assert response is not None and response.status == 403
    assert "has ended" in await page.content()
    await owner.close()
