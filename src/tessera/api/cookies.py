"""The `session` and `csrf` cookies (essential: they serve login)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.responses import Response

from tessera.config import Settings
from tessera.edge.privacy import parse_cookies
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
    """The value of tessera's own cookie `name`, read strictly, or None: the edge's parser
    (edge/privacy.py `parse_cookies`), for code that has headers rather than the edge's
    parsed cookies. A name present more than once counts as absent; an empty value too."""
    values = (headers.getlist("cookie") if isinstance(headers, Headers)
              else [headers.get("cookie", "")])
    wanted = name.encode("latin-1")
    found: dict[bytes, bytes] = {}
    for header in values:
        parse_cookies(header.encode("latin-1"), frozenset({wanted}), found)
    return found.get(wanted, b"").decode("latin-1") or None
