"""The demo frontend (examples/frontend) in a real browser: Chromium driven by Playwright.

A real `tessera serve` process (embedded defaults in a temporary data folder, plain HTTP, so
the cookies are `session` and `csrf`) and the page's own static server run on two ports of
127.0.0.1: two origins, so every call from the page is a CORS request with credentials.

Needs the `playwright` Python package and a Chromium on the machine (Debian: `apt-get install
chromium`); Playwright's own browser downloads are never used. Without either, the tests skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.mailbox import SmtpServer

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="the playwright package is not installed (pip install playwright)")
Browser = playwright_api.Browser
Page = playwright_api.Page
Response = playwright_api.Response
expect = playwright_api.expect

ROOT = Path(__file__).resolve().parents[1]
FRONTEND = ROOT / "examples" / "frontend"
SCREENSHOT = ROOT / "docs" / "frontend.png"
PASSWORD = "correct horse battery staple"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# A phone's browser, for a second session of the same user.
PHONE_UA = "Mozilla/5.0 (Android 14; Mobile; rv:128.0) Gecko/128.0 Firefox/128.0"


# ---- processes ------------------------------------------------------------------------------


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tessera serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"tessera did not answer /healthz within {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[Any], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Servers:
    api: str  # tessera's base URL
    page_origin: str
    page_url: str  # the page, told where tessera is


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = _chromium()
    if path is None:
        pytest.skip("no Chromium found (/usr/bin/chromium or chromium on PATH); "
                    "install it with: apt-get install chromium")
    return path


@pytest.fixture(scope="module")
def mailbox() -> Iterator[SmtpServer]:
    """The real SMTP server tessera delivers this module's mails to."""
    server = SmtpServer(_free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, chromium_path: str,
            mailbox: SmtpServer) -> Iterator[Servers]:
    work = tmp_path_factory.mktemp("browser")
    api = f"http://127.0.0.1:{_free_port()}"

    page_server = subprocess.Popen(
        [sys.executable, str(FRONTEND / "serve.py"), "--host", "127.0.0.1", "--port", "0",
         "--api", api, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert page_server.stdout is not None
        first = page_server.stdout.readline().strip()
        assert first.startswith("page: http://127.0.0.1:"), first
        page_url = first.removeprefix("page: ")
        page_origin = page_url.split("/?", 1)[0]

        # Only the settings named here: no TESSERA_* from the caller, no .env from the repo.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env.update(TESSERA_DATA_DIR=str(work / "data"), TESSERA_COOKIE_SECURE="false",
                   TESSERA_CORS_ORIGINS=page_origin, TESSERA_BCRYPT_ROUNDS="4",
                   TESSERA_LOG_LEVEL="warning", TESSERA_SMTP_URL=mailbox.url,
                   TESSERA_PUBLIC_URL=page_origin)  # mailed links open the page
        log = work / "tessera.log"
        with log.open("wb") as log_file:
            tessera = subprocess.Popen(
                [sys.executable, "-m", "tessera.ops.cli", "serve", "--host", "127.0.0.1",
                 "--port", api.rsplit(":", 1)[1]],
                cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_healthy(api, tessera, log)
            yield Servers(api=api, page_origin=page_origin, page_url=page_url)
        finally:
            # SIGINT, not SIGTERM: `tessera serve` then stops its embedded redis-server too.
            _stop(tessera, signal.SIGINT)
    finally:
        _stop(page_server, signal.SIGTERM)


@pytest.fixture(scope="module")
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    playwright = await playwright_api.async_playwright().start()
    try:
        chromium = await playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()
    finally:
        await playwright.stop()


# ---- helpers --------------------------------------------------------------------------------


class TesseraTraffic:
    """Every response from tessera to the page (CORS preflights aside), and page errors."""

    def __init__(self, page: Page, api: str) -> None:
        self.api = api
        self.responses: list[Response] = []
        self.errors: list[str] = []
        page.on("response", self._on_response)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _on_response(self, response: Response) -> None:
        if response.url.startswith(self.api + "/") and response.request.method != "OPTIONS":
            self.responses.append(response)

    async def tk_values(self) -> set[str | None]:
        return {await r.header_value("tk") for r in self.responses}


async def open_page(page: Page, servers: Servers) -> None:
    await page.goto(servers.page_url)
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")


async def register_via_page(page: Page, email: str, *, adult: bool = True) -> None:
    await page.locator("#reg-email").fill(email)
    await page.locator("#reg-password").fill(PASSWORD)
    await page.get_by_label("I am 18 or older").set_checked(adult)
    await page.get_by_role("button", name="Register").click()


async def log_in_via_page(page: Page, email: str) -> None:
    await page.locator("#login-email").fill(email)
    await page.locator("#login-password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.locator("#who")).to_have_text(email)


async def fetch_from_page(page: Page, url: str, method: str = "GET",
                          headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A request made by the page's own script (its origin, its cookies)."""
    return await page.evaluate(
        """async ([url, method, headers]) => {
             const r = await fetch(url, {method, headers, credentials: "include"});
             const type = r.headers.get("Content-Type") || "";
             return {status: r.status, body: type.includes("json") ? await r.json() : null};
           }""",
        [url, method, headers or {}])


async def cookie_jar(page: Page, api: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: dict(c) for c in await page.context.cookies(api)}


# ---- tests ----------------------------------------------------------------------------------


async def test_register_log_in_reload_end_session_log_out(
        browser: Browser, servers: Servers, tmp_path: Path) -> None:
    # The desktop browser's own agent string, minus "Headless", for a tidy screenshot.
    desktop_ua = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                  f"Chrome/{browser.version} Safari/537.36")
    context = await browser.new_context(
        viewport={"width": 1000, "height": 600}, user_agent=desktop_ua, locale="en-US",
        timezone_id="UTC")
    page = await context.new_page()
    traffic = TesseraTraffic(page, servers.api)
    await open_page(page, servers)
    await expect(page.locator("#who")).to_have_text("not logged in")
    await expect(page.locator("#api-base")).to_have_text(servers.api)

    # Registration needs the JSON boolean is_adult: true; the unchecked box sends false.
    email = "ada@example.com"
    await register_via_page(page, email, adult=False)
    await expect(page.locator("#status")).to_contain_text("underage")
    await register_via_page(page, email)
    await expect(page.locator("#status")).to_contain_text(f"Account created for {email}")

    # Log in: tessera sets the cookies for its own origin, cross-origin, with credentials.
    await log_in_via_page(page, email)
    await expect(page.locator("#me-email")).to_have_text(email)
    await expect(page.locator("#sessions tbody tr")).to_have_count(1)
    await expect(page.locator("#sessions tbody tr.current")).to_contain_text("this browser")
    jar = await cookie_jar(page, servers.api)
    assert {"session", "csrf", "visitor"} <= set(jar), jar.keys()
    assert jar["session"]["httpOnly"] and not jar["csrf"]["httpOnly"]
    assert jar["session"]["sameSite"] == jar["csrf"]["sameSite"] == "Lax"
    assert not jar["session"]["secure"]  # TESSERA_COOKIE_SECURE=false: plain names, no Secure
    # The page reads the csrf cookie: cookies are per host, not per port.
    assert f"csrf={jar['csrf']['value']}" in await page.evaluate("document.cookie")
    assert await traffic.tk_values() == {"T"}  # no DNT: tracked, and a visitor cookie is set

    # A second device logs in as the same user.
    phone = await browser.new_context(user_agent=PHONE_UA, locale="en-US", timezone_id="UTC")
    phone_page = await phone.new_page()
    await open_page(phone_page, servers)
    await log_in_via_page(phone_page, email)
    phone_csrf = (await cookie_jar(phone_page, servers.api))["csrf"]["value"]

    await page.get_by_role("button", name="Refresh").click()
    await expect(page.locator("#sessions tbody tr")).to_have_count(2)
    await expect(page.locator("#sessions tbody tr:not(.current)")).to_contain_text(
        "Firefox 128 on Android")
    shot = await page.screenshot(full_page=True)
    (tmp_path / "frontend.png").write_bytes(shot)
    if os.environ.get("TESSERA_UPDATE_SCREENSHOT"):  # refresh the README's picture on demand
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(shot)

    # Reload: the session cookie keeps the page logged in.
    await page.reload()
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await expect(page.locator("#who")).to_have_text(email)

    # A state-changing request from the page without X-CSRF-Token is refused, and so is one
    # with the csrf value of another session; the session survives both.
    logout = f"{servers.api}/auth/logout"
    refused = await fetch_from_page(page, logout, "POST")
    assert refused["status"] == 403 and refused["body"]["code"] == "csrf_failed", refused
    foreign = await fetch_from_page(page, logout, "POST", {"X-CSRF-Token": phone_csrf})
    assert foreign["status"] == 403 and foreign["body"]["code"] == "csrf_failed", foreign
    assert (await fetch_from_page(page, f"{servers.api}/me"))["status"] == 200

    # End the phone's session from here: the phone is logged out at once.
    await page.get_by_role("button", name="End session", exact=True).click()
    await expect(page.locator("#sessions tbody tr")).to_have_count(1)
    await expect(page.locator("#status")).to_contain_text("Session ended")
    await phone_page.reload()
    await expect(phone_page.locator("#who")).to_have_text("not logged in")
    await phone.close()

    # Log out: the page shows it, GET /me answers 401, and both cookies are gone.
    await page.get_by_role("button", name="Log out").click()
    await expect(page.locator("#who")).to_have_text("not logged in")
    await expect(page.locator("#status")).to_contain_text("401")
    me = await fetch_from_page(page, f"{servers.api}/me")
    assert me["status"] == 401 and me["body"]["code"] == "not_authenticated", me
    jar = await cookie_jar(page, servers.api)
    assert "session" not in jar and "csrf" not in jar, jar.keys()
    await page.reload()
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await expect(page.locator("#logged-out")).to_be_visible()

    assert traffic.errors == []
    await context.close()


async def test_do_not_track_sets_no_visitor_cookie(browser: Browser, servers: Servers) -> None:
    context = await browser.new_context(extra_http_headers={"DNT": "1"})
    page = await context.new_page()
    traffic = TesseraTraffic(page, servers.api)
    await open_page(page, servers)
    email = "grace@example.com"
    await register_via_page(page, email)
    await expect(page.locator("#status")).to_contain_text("Account created")
    await log_in_via_page(page, email)

    jar = await cookie_jar(page, servers.api)
    assert {"session", "csrf"} <= set(jar), jar.keys()  # essential: login still works
    assert "visitor" not in jar, jar.keys()
    assert traffic.responses and await traffic.tk_values() == {"N"}
    await expect(page.locator("#tk")).to_contain_text("N: not tracked")
    assert traffic.errors == []
    await context.close()


async def test_verify_forget_and_reset_the_password_from_the_mails(
        browser: Browser, servers: Servers, mailbox: SmtpServer) -> None:
    context = await browser.new_context(locale="en-US", timezone_id="UTC")
    page = await context.new_page()
    traffic = TesseraTraffic(page, servers.api)
    await open_page(page, servers)
    email = "lin@example.com"
    await register_via_page(page, email)
    await expect(page.locator("#status")).to_contain_text(f"Account created for {email}")

    # The verification mail's link opens the page, which fills the code in and wipes the link.
    verify = (await mailbox.wait_for(email, "verify"))[0]
    link = f"{servers.page_origin}/verify-email#token={verify.token}"
    assert link in verify.text
    await page.goto(link)
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await expect(page.locator("#verify-token")).to_have_value(verify.token)
    assert verify.token not in page.url
    await page.get_by_role("button", name="Verify", exact=True).click()
    await expect(page.locator("#status")).to_contain_text("verified")

    # Forgot the password: the reset mail's link, a new password, then a login with it.
    await page.locator("#forgot-email").fill(email)
    await page.get_by_role("button", name="Send a reset link").click()
    await expect(page.locator("#status")).to_contain_text("reset mail is on its way")
    reset = (await mailbox.wait_for(email, "reset"))[0]
    opened = await page.goto(f"{servers.page_origin}/reset-password#token={reset.token}")
    assert opened is not None and await opened.header_value("referrer-policy") == "no-referrer"
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await expect(page.locator("#reset-token")).to_have_value(reset.token)
    new_password = "a new and longer passphrase"
    await page.locator("#reset-password").fill(new_password)
    await page.get_by_role("button", name="Set the new password").click()
    await expect(page.locator("#status")).to_contain_text("Password changed")
    await mailbox.wait_for(email, "password_changed")

    await page.locator("#login-email").fill(email)
    await page.locator("#login-password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.locator("#status")).to_contain_text("invalid_credentials")
    await page.locator("#login-password").fill(new_password)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.locator("#who")).to_have_text(email)
    await expect(page.locator("#me-verified")).to_have_text("yes")
    # Each API answer the page got says no-referrer too.
    assert {await r.header_value("referrer-policy") for r in traffic.responses} == {"no-referrer"}
    assert traffic.errors == []
    await context.close()


async def test_tesseras_own_reset_page_takes_the_token_from_the_link(
        browser: Browser, servers: Servers, mailbox: SmtpServer) -> None:
    import httpx

    email = "noor@example.com"
    async with httpx.AsyncClient(base_url=servers.api) as api:
        registered = await api.post("/auth/register", json={
            "email": email, "password": PASSWORD, "is_adult": True})
        assert registered.status_code == 201
        assert (await api.post("/auth/password-reset", json={"email": email})).status_code == 202
        reset = (await mailbox.wait_for(email, "reset"))[0]

        context = await browser.new_context(locale="en-US", timezone_id="UTC")
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        opened = await page.goto(f"{servers.api}/reset-password#token={reset.token}")
        assert opened is not None and await opened.header_value("referrer-policy") == "no-referrer"
        await expect(page.locator("body")).to_have_attribute("data-ready", "true")
        await expect(page.locator("#reset-token")).to_have_value(reset.token)
        assert reset.token not in page.url
        await page.locator("#reset-new-password").fill("short")
        await page.get_by_role("button", name="Set the new password").click()
        await expect(page.locator("#status")).to_contain_text("validation_error")
        await page.locator("#reset-new-password").fill("another long passphrase")
        await page.get_by_role("button", name="Set the new password").click()
        await expect(page.locator("#status")).to_contain_text("every session has ended")
        assert errors == []
        await context.close()
        logged_in = await api.post("/auth/login", json={
            "email": email, "password": "another long passphrase"})
        assert logged_in.status_code == 200
