"""Second factors in a real browser: the demo page enrols TOTP (QR code drawn by segno) and a
passkey, then logs in with each, and with a recovery code. Chromium's DevTools WebAuthn
domain provides a virtual platform authenticator (CTAP2, resident keys, user verification),
so the passkey ceremonies are the browser's own.

WebAuthn refuses IP addresses as relying-party ids, so here both the page and tessera are
reached as `localhost` (bound to 127.0.0.1), and TESSERA_PUBLIC_URL names the page: the
RP id (`localhost`) and the allowed origin (the page's) are its defaults.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pyotp
import pytest

from tests.test_browser import (
    CHROMIUM_ARGS,
    FRONTEND,
    PASSWORD,
    Servers,
    _free_port,
    _stop,
    _wait_healthy,
    browser,  # noqa: F401 (a fixture)
    chromium_path,  # noqa: F401 (a fixture)
    open_page,
    playwright_api,
    register_via_page,
)

Browser = playwright_api.Browser
Page = playwright_api.Page
expect = playwright_api.expect
assert CHROMIUM_ARGS


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory,
            chromium_path: str) -> Iterator[Servers]:  # noqa: F811
    work = tmp_path_factory.mktemp("browser-mfa")
    api_port, page_port = _free_port(), _free_port()
    api = f"http://localhost:{api_port}"
    page_origin = f"http://localhost:{page_port}"
    page_server = subprocess.Popen(
        [sys.executable, str(FRONTEND / "serve.py"), "--host", "127.0.0.1", "--port",
         str(page_port), "--api", api, "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env.update(TESSERA_DATA_DIR=str(work / "data"), TESSERA_COOKIE_SECURE="false",
                   TESSERA_CORS_ORIGINS=page_origin, TESSERA_BCRYPT_ROUNDS="4",
                   TESSERA_PUBLIC_URL=page_origin, TESSERA_LOG_LEVEL="warning")
        log = work / "tessera.log"
        with log.open("wb") as log_file:
            tessera = subprocess.Popen(
                [sys.executable, "-m", "tessera.ops.cli", "serve", "--host", "127.0.0.1",
                 "--port", str(api_port)],
                cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_healthy(f"http://127.0.0.1:{api_port}", tessera, log)
            yield Servers(api=api, page_origin=page_origin,
                          page_url=f"{page_origin}/?api={api}")
        finally:
            _stop(tessera, signal.SIGINT)
    finally:
        _stop(page_server, signal.SIGTERM)


async def add_virtual_authenticator(page: Page) -> None:
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable", {"enableUI": False})
    await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
        "hasUserVerification": True, "isUserVerified": True,
        "automaticPresenceSimulation": True}})


async def log_out(page: Page) -> None:
    await page.get_by_role("button", name="Log out").click()
    await expect(page.locator("#who")).to_have_text("not logged in")


async def password_step(page: Page, email: str) -> None:
    await page.locator("#login-email").fill(email)
    await page.locator("#login-password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in", exact=True).click()
    await expect(page.locator("#mfa-form")).to_be_visible()


async def test_enrol_totp_and_a_passkey_then_log_in_with_each(
        browser: Browser, servers: Servers) -> None:  # noqa: F811
    context = await browser.new_context(locale="en-US", timezone_id="UTC")
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await add_virtual_authenticator(page)
    await open_page(page, servers)
    email = "hedy@example.com"
    await register_via_page(page, email)
    await expect(page.locator("#status")).to_contain_text("Account created")
    await page.locator("#login-email").fill(email)
    await page.locator("#login-password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in", exact=True).click()
    await expect(page.locator("#who")).to_have_text(email)

    # TOTP: the page shows the secret and a QR code; the first code comes from pyotp, as
    # from the user's authenticator app.
    await page.locator("#factor-password").fill(PASSWORD)
    await page.get_by_role("button", name="Set up authenticator app").click()
    await expect(page.locator("#totp-setup")).to_be_visible()
    await expect(page.locator("#totp-qr")).to_be_visible()
    assert (await page.locator("#totp-qr").get_attribute("src") or "").startswith(
        "data:image/svg+xml")
    secret = await page.locator("#totp-secret").text_content()
    assert secret
    await page.locator("#totp-code").fill(pyotp.TOTP(secret).now())
    await page.locator("#totp-confirm").click()
    await expect(page.locator("#recovery-codes li")).to_have_count(10)
    await expect(page.locator("#totp-state")).to_have_text("on")
    recovery = await page.locator("#recovery-codes li").all_text_contents()

    # A passkey, made by the browser's virtual authenticator. Adding a factor needs the
    # password and the enrolled one: here a recovery code (the TOTP step is spent).
    await page.locator("#factor-code").fill(recovery[-1])
    await page.locator("#passkey-name").fill("virtual key")
    await page.get_by_role("button", name="Add a passkey").click()
    await expect(page.locator("#passkeys li")).to_have_count(1)
    await expect(page.locator("#passkeys li")).to_contain_text("virtual key")

    # Password, then a TOTP code (the next time step: the confirmation used this one).
    await log_out(page)
    await password_step(page, email)
    await page.locator("#mfa-code").fill(pyotp.TOTP(secret).at(time.time() + 30))
    await page.locator("#mfa-form").get_by_role("button", name="Verify").click()
    await expect(page.locator("#who")).to_have_text(email)
    await expect(page.locator("#status")).to_contain_text("second factor")

    # A passkey alone: no email, no password.
    await log_out(page)
    await page.get_by_role("button", name="Passkey sign-in").click()
    await expect(page.locator("#who")).to_have_text(email)
    await expect(page.locator("#status")).to_contain_text("Logged in with a passkey")

    # Password, then the passkey as the second factor.
    await log_out(page)
    await password_step(page, email)
    await page.get_by_role("button", name="Use a passkey").click()
    await expect(page.locator("#who")).to_have_text(email)

    # The phone is lost: a recovery code gets in, once.
    await log_out(page)
    await password_step(page, email)
    await page.locator("#mfa-code").fill(recovery[0])
    await page.locator("#mfa-form").get_by_role("button", name="Verify").click()
    await expect(page.locator("#who")).to_have_text(email)
    await expect(page.locator("#recovery-left")).to_have_text("8")
    await log_out(page)
    await password_step(page, email)
    await page.locator("#mfa-code").fill(recovery[0])
    await page.locator("#mfa-form").get_by_role("button", name="Verify").click()
    await expect(page.locator("#status")).to_contain_text("invalid_code")

    assert errors == []
    await context.close()
