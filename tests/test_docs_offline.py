"""/docs and /redoc work on a host with no internet access (API.md "Changes to v1"): every
asset they load is served by tessera, and the pages say so in a Content-Security-Policy."""

from __future__ import annotations

import re
from typing import Any

import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_only_assets_tessera_serves(client: Any, page: str) -> None:
    answer = await client.get(page)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    html = answer.text
    urls = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', html)
    urls += re.findall(r"url:\s*'([^']+)'", html)
    assert urls, html
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url  # nothing off-site
    assert "cdn" not in html.lower() and "googleapis" not in html
    for url in urls:
        if url.startswith("/docs/assets/"):
            asset = await client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 100, url
    csp = answer.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    if "<script>" in html:  # Swagger UI's inline start-up script, allowed by its hash only
        assert "'sha256-" in csp and "'unsafe-inline'" not in csp.split("style-src")[0]
    assert "http" not in csp  # no other origin is allowed


async def test_the_openapi_document_and_the_oauth2_redirect_are_served(client: Any) -> None:
    assert (await client.get("/openapi.json")).status_code == 200
    redirect = await client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200 and "content-security-policy" in redirect.headers
    assert (await client.get("/docs/assets/nothing.js")).status_code == 404
    assert (await client.get("/docs/assets/..%2Fcore.py")).status_code == 404


async def test_docs_render_in_a_browser_that_can_reach_nothing_but_tessera(server: Any) -> None:
    """A real Chromium, every request off tessera's origin refused: both pages render, and
    the Content-Security-Policy blocks nothing they need."""
    import shutil

    playwright_api = pytest.importorskip("playwright.async_api")
    chromium_path = shutil.which("chromium")
    if chromium_path is None:
        pytest.skip("no Chromium (apt-get install chromium)")
    from tests.test_browser import CHROMIUM_ARGS

    playwright = await playwright_api.async_playwright().start()
    try:
        browser = await playwright.chromium.launch(executable_path=chromium_path,
                                                   args=CHROMIUM_ARGS, headless=True)
        page = await browser.new_page()
        offsite: list[str] = []
        problems: list[str] = []

        async def only_tessera(route: Any) -> None:
            if route.request.url.startswith(server.url):
                await route.continue_()
            else:
                offsite.append(route.request.url)
                await route.abort()

        await page.route("**/*", only_tessera)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        await page.goto(server.url + "/docs")
        await page.wait_for_selector(".swagger-ui .info .title", timeout=15000)
        assert "tessera" in await page.inner_text(".swagger-ui .info .title")
        await page.goto(server.url + "/redoc")
        await page.wait_for_selector("h1", timeout=15000)
        assert "tessera" in await page.inner_text("h1")
        await browser.close()
    finally:
        await playwright.stop()
    assert offsite == []
    # ReDoc's bundle would show its "powered by" logo from its CDN: the policy refuses it,
    # the only thing it refuses (cosmetic).
    blocked = [p for p in problems if "Content Security Policy" in p]
    assert all("cdn.redoc.ly" in p and "image" in p for p in blocked), problems
