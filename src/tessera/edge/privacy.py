"""Privacy middleware (pure ASGI): Do-Not-Track / Global Privacy Control, and the usage log.

The one place that decides whether a request may be tracked:
- not when it carries `DNT: 1` or `Sec-GPC: 1`;
- not when the authenticated user restricted or objected to processing
  (the auth dependency calls `forbid_tracking`).
An untracked response loses every non-essential `Set-Cookie`, says `Tk: N`, and records
no usage event; a tracked one says `Tk: T` and gets a `visitor` cookie if it had none.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, MutableMapping
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.config import VISITOR_COOKIE, Settings
from tessera.stores.usage import UsageRecorder

# The cookies that serve login. Every other cookie is non-essential.
ESSENTIAL_COOKIES = frozenset({"session", "csrf", "__Host-session", "__Host-csrf"})
VISITOR_MAX_AGE = 365 * 24 * 3600

_TRACKING = "tracking_allowed"
_USAGE_USER = "usage_user_id"


def _state(scope: Scope) -> MutableMapping[str, Any]:
    state: MutableMapping[str, Any] = scope.setdefault("state", {})
    return state


def forbid_tracking(scope: Scope) -> None:
    _state(scope)[_TRACKING] = False


def attribute_usage(scope: Scope, user_id: str) -> None:
    """Mark the request as made by this user, for the usage log."""
    _state(scope)[_USAGE_USER] = user_id


OPT_OUT_HEADERS = (b"dnt", b"sec-gpc")  # `DNT: 1`, `Sec-GPC: 1`
_VISITOR_PREFIX = VISITOR_COOKIE.encode() + b"="


def opts_out(name: bytes, value: bytes) -> bool:
    """Whether this request header says Do-Not-Track or Global Privacy Control."""
    return name in OPT_OUT_HEADERS and value.strip() == b"1"


def carries_visitor(cookie_header: bytes) -> bool:
    """Whether a Cookie header holds the visitor cookie. Names only: no unquoting of values
    (see HeaderLimitMiddleware)."""
    return any(part.strip().startswith(_VISITOR_PREFIX) for part in cookie_header.split(b";"))


def _opted_out(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(opts_out(name, value) for name, value in headers)


def _has_visitor_cookie(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"cookie" and carries_visitor(value) for name, value in headers)


def _cookie_name(set_cookie: str) -> str:
    return set_cookie.split("=", 1)[0].strip()


class _VisitorIds:
    """Visitor ids (18 random bytes, 24 base64url characters) made 256 at a time from one
    os.urandom draw: one system call and one encoding per 256 responses instead of one each.
    A forked child starts with none (`os.register_at_fork`), so two processes never hand out
    the same ids."""

    BATCH = 256

    def __init__(self) -> None:
        self._ids: list[bytes] = []
        os.register_at_fork(after_in_child=self._ids.clear)

    def next(self) -> bytes:
        if not self._ids:
            encoded = base64.urlsafe_b64encode(os.urandom(18 * self.BATCH))
            self._ids.extend(encoded[i:i + 24] for i in range(0, len(encoded), 24))
        return self._ids.pop()


_visitor_ids = _VisitorIds()


def visitor_set_cookie(settings: Settings) -> Callable[[], bytes]:
    """Makes the `Set-Cookie` value of a new visitor id."""
    secure = "; Secure" if settings.cookie_secure else ""
    attrs = f"; Max-Age={VISITOR_MAX_AGE}; Path=/; SameSite=Lax; HttpOnly{secure}".encode()
    prefix = VISITOR_COOKIE.encode() + b"="

    def make() -> bytes:
        return prefix + _visitor_ids.next() + attrs

    return make


class PrivacyMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, usage: UsageRecorder) -> None:
        self.app = app
        self.usage = usage
        self._visitor_cookie = visitor_set_cookie(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        state = _state(scope)
        state[_TRACKING] = not _opted_out(headers)
        state[_USAGE_USER] = None
        status = 0
        nbytes = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, nbytes
            if message["type"] == "http.response.start":
                status = message["status"]
                self._edit_headers(message, state, headers)
            elif message["type"] == "http.response.body":
                nbytes += len(message.get("body", b""))
                if not message.get("more_body", False):
                    self._record(scope, state, status, nbytes)
            await send(message)

        await self.app(scope, receive, send_wrapper)

    def _edit_headers(self, message: Message, state: MutableMapping[str, Any],
                      request_headers: list[tuple[bytes, bytes]]) -> None:
        response_headers = MutableHeaders(scope=message)
        response_headers.append("Vary", "DNT, Sec-GPC")
        if state.get(_TRACKING, True):
            response_headers["Tk"] = "T"
            if not _has_visitor_cookie(request_headers):
                response_headers.append("Set-Cookie", self._visitor_cookie().decode())
            return
        response_headers["Tk"] = "N"
        cookies = response_headers.getlist("set-cookie")
        if cookies:
            del response_headers["set-cookie"]
            for cookie in cookies:
                if _cookie_name(cookie) in ESSENTIAL_COOKIES:
                    response_headers.append("Set-Cookie", cookie)

    def _record(self, scope: Scope, state: MutableMapping[str, Any], status: int,
                nbytes: int) -> None:
        user_id = state.get(_USAGE_USER)
        if not user_id or not state.get(_TRACKING, True):
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        client = scope.get("client")
        self.usage.record(user_id=user_id, ip=client[0] if client else None,
                          method=scope["method"], path=scope["path"], host=host, status=status,
                          nbytes=nbytes)
