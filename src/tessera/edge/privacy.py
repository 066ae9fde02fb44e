"""The privacy rules the edge applies (P3, P4): who may be tracked, which cookies are
essential, the visitor cookie.

The one place that decides whether a request may be tracked (`Edge` in edge/edge.py calls
these, before the route runs, for every answer):
- not when it carries `DNT: 1` or `Sec-GPC: 1`;
- not when the user it is authenticated as restricted or objected to processing;
- not for the operator endpoints (`/healthz`, `/readyz`, `/metrics`): no visitor cookie there.
An untracked response loses every non-essential `Set-Cookie`, says `Tk: N`, and records
no usage event; a tracked one says `Tk: T` and gets a `visitor` cookie if it had none.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, MutableMapping
from typing import Any

from starlette.types import Scope

from tessera.config import VISITOR_COOKIE, Settings

# The cookies that serve login. Every other cookie is non-essential.
ESSENTIAL_COOKIES = frozenset({"session", "csrf", "__Host-session", "__Host-csrf"})
VISITOR_MAX_AGE = 365 * 24 * 3600
# Operator endpoints: no visitor cookie, no tracking.
UNTRACKED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

TRACKING = "tracking_allowed"
USAGE_USER = "usage_user_id"

OPT_OUT_HEADERS = (b"dnt", b"sec-gpc")  # `DNT: 1`, `Sec-GPC: 1`


def state_of(scope: Scope) -> MutableMapping[str, Any]:
    state: MutableMapping[str, Any] = scope.setdefault("state", {})
    return state


def forbid_tracking(scope: Scope) -> None:
    state_of(scope)[TRACKING] = False


def attribute_usage(scope: Scope, user_id: str) -> None:
    """Mark the request as made by this user, for the usage log ("" records nothing)."""
    state_of(scope)[USAGE_USER] = user_id


def opts_out(name: bytes, value: bytes) -> bool:
    """Whether this request header says Do-Not-Track or Global Privacy Control."""
    return name in OPT_OUT_HEADERS and value.strip() == b"1"


def parse_cookies(header: bytes, wanted: frozenset[bytes], found: dict[bytes, bytes]) -> None:
    """Strict Cookie parsing for tessera's own cookies (the one parser; issue 12.7): pairs
    trimmed of spaces (0x20) only, so a name matches only exactly (no stripping of tabs, NBSP
    or NEL, which `http.cookies` would treat as space); a name sent more than once (in one
    header or across several: call this for each) counts as absent (b""), since which one a
    browser sends first depends on paths and ages an attacker may control (cookie tossing).
    Values are taken as sent (tessera's values need no unquoting)."""
    for part in header.split(b";"):
        name, sep, value = part.strip(b" ").partition(b"=")
        if not sep or name not in wanted:
            continue
        found[name] = b"" if name in found else value.strip(b" ")


class _VisitorIds:
    """Visitor ids (18 random bytes, 24 base64url characters) made 256 at a time from one
    os.urandom draw. A forked child starts with none (`os.register_at_fork`), so two
    processes never hand out the same ids."""

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


def cookie_name(set_cookie: bytes) -> str:
    return set_cookie.split(b"=", 1)[0].strip().decode("latin-1")
