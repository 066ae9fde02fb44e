"""The `session` and `csrf` cookies (essential: they serve login)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.responses import Response

from tessera.config import Settings
from tessera.security.tokens import IssuedToken


def _cookie(name: str, value: str, max_age: int, *, http_only: bool, secure: bool) -> str:
    parts = [f"{name}={value}", f"Max-Age={max_age}", "Path=/", "SameSite=Lax"]
    if http_only:
        parts.append("HttpOnly")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def set_login_cookies(response: Response, settings: Settings, issued: IssuedToken,
                      csrf: str) -> None:
    max_age = max(0, issued.exp - int(time.time()))
    secure = settings.cookie_secure
    response.headers.append("Set-Cookie", _cookie(settings.session_cookie, issued.token, max_age,
                                                  http_only=True, secure=secure))
    response.headers.append("Set-Cookie", _cookie(settings.csrf_cookie, csrf, max_age,
                                                  http_only=False, secure=secure))


def clear_login_cookies(response: Response, settings: Settings) -> None:
    secure = settings.cookie_secure
    response.headers.append("Set-Cookie", _cookie(settings.session_cookie, "", 0,
                                                  http_only=True, secure=secure))
    response.headers.append("Set-Cookie", _cookie(settings.csrf_cookie, "", 0,
                                                  http_only=False, secure=secure))


def read_cookie(headers: Headers | Mapping[str, str], name: str) -> str | None:
    """The value of tessera's own cookie `name`, read strictly (issue 12.7), or None.

    The Cookie header is split on ';' and each pair trimmed of spaces (0x20) only; the name
    must then be exactly `name`. Python's http.cookies and Starlette strip() every Unicode
    space, so `\\xa0session=`, `\\x85session=` or a tab-prefixed name would pass for
    `session`, letting a cookie set under another name stand in for it. A name present more
    than once (in one header or across several) counts as absent: which one the browser
    sends first depends on paths and ages an attacker may control (cookie tossing). An empty
    value is absent."""
    values = (headers.getlist("cookie") if isinstance(headers, Headers)
              else [headers.get("cookie", "")])
    found: str | None = None
    seen = False
    for header in values:
        for pair in header.split(";"):
            key, sep, value = pair.strip(" ").partition("=")
            if not sep or key != name:
                continue
            if seen:
                return None
            seen, found = True, value.strip(" ")
    return found or None
