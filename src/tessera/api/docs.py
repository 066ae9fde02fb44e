"""/docs (Swagger UI) and /redoc that work offline: their scripts and styles are served by
tessera from the pinned `fastapi-offline` package (no CDN), and the pages carry a
Content-Security-Policy that allows nothing from elsewhere."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from starlette.responses import FileResponse, HTMLResponse, Response

from tessera.errors import Problem

ASSETS_PATH = "/docs/assets"
ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
          "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
OAUTH2_REDIRECT = "/docs/oauth2-redirect"

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def _csp(html: str) -> str:
    """Scripts from tessera itself and the page's own inline scripts (by hash); inline
    styles (both UIs use them); ReDoc's web worker from a blob."""
    hashes = "".join(
        " 'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(html))
    return ("default-src 'none'; "
            f"script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
            "worker-src 'self' blob:; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")


def _text(response: Response) -> str:
    return bytes(response.body).decode()


def _page(html: str) -> HTMLResponse:
    return HTMLResponse(html, headers={"Content-Security-Policy": _csp(html),
                                       "Cache-Control": "no-cache"})


def install_docs(app: FastAPI) -> None:
    """Create the app with docs_url=None and redoc_url=None, then call this."""
    openapi_url = app.openapi_url or "/openapi.json"

    @lru_cache(maxsize=1)
    def swagger() -> str:
        return _text(get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
            oauth2_redirect_url=OAUTH2_REDIRECT))

    @lru_cache(maxsize=1)
    def redoc() -> str:
        return _text(get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
                              with_google_fonts=False))

    @lru_cache(maxsize=1)
    def oauth2_redirect() -> str:
        return _text(get_swagger_ui_oauth2_redirect_html())

    async def docs_page(request: Request) -> Response:
        return _page(swagger())

    async def redoc_page(request: Request) -> Response:
        return _page(redoc())

    async def redirect_page(request: Request) -> Response:
        return _page(oauth2_redirect())

    async def asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise Problem("not_found", "No such asset.")
        return FileResponse(ASSETS_DIR / name, media_type=media_type,
                            headers={"Cache-Control": "public, max-age=86400"})

    app.add_api_route("/docs", docs_page, include_in_schema=False)
    app.add_api_route("/redoc", redoc_page, include_in_schema=False)
    app.add_api_route(OAUTH2_REDIRECT, redirect_page, include_in_schema=False)
    app.add_api_route(ASSETS_PATH + "/{name}", asset, include_in_schema=False)
