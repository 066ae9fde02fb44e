"""tessera's own small pages for mailed links: /verify-email, /reset-password, /confirm-email.

With `TESSERA_PUBLIC_URL` left at tessera itself (the embedded default), the links in mails
open these; a deployment with its own frontend points `TESSERA_PUBLIC_URL` there instead.
Static files (package data), a strict CSP, and like every answer `Referrer-Policy:
no-referrer`: the token is in the fragment, and no Referer leaves these pages.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

router = APIRouter(include_in_schema=False)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
          "css": "text/css; charset=utf-8"}


@lru_cache(maxsize=8)
def _file(name: str) -> bytes:
    return resources.files("tessera.api").joinpath("pages", name).read_bytes()


def _page(name: str) -> Response:
    return Response(_file(name), media_type=_TYPES[name.rsplit(".", 1)[1]],
                    headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


@router.get("/verify-email")
@router.get("/reset-password")
@router.get("/confirm-email")
async def mail_link_page() -> Response:
    return _page("recover.html")


@router.get("/_mail/recover.js")
async def mail_link_script() -> Response:
    return _page("recover.js")


@router.get("/_mail/recover.css")
async def mail_link_style() -> Response:
    return _page("recover.css")
