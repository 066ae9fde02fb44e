"""The `session` and `csrf` cookies (essential: they serve login)."""

from __future__ import annotations

import time

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
