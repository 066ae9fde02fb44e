"""The one pure-ASGI edge in front of every route.

One pass over the request headers does what six middlewares did before: the request id,
header and body limits (431, 413), the tracking decision (DNT / GPC, and the user's
restriction or objection, looked up with the one token check before the route runs, so
every answer, a 404 and a CSRF failure included, says the right `Tk`), `Vary`, the
`visitor` cookie, security headers, the usage event (P4) and the request metrics. The
principal it finds is handed to the routes on `scope["state"]`, so a request's token is
checked once. CORS stays Starlette's middleware, inside this one.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.config import VISITOR_COOKIE, Settings
from tessera.domain.auth import Principal, TokenChecker
from tessera.edge.privacy import (
    ESSENTIAL_COOKIES,
    OPT_OUT_HEADERS,
    TRACKING,
    UNTRACKED_PATHS,
    USAGE_USER,
    cookie_name,
    opts_out,
    parse_cookies,
    visitor_set_cookie,
)
from tessera.errors import BodyTooLarge, problem_body
from tessera.metrics import Metrics
from tessera.stores.durability import ending_sessions, reset_ending_sessions
from tessera.stores.usage import UsageRecorder

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None)
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Generated ids: a random per-process prefix and a counter. Unique per process and cheap (no
# system call per request); an id correlates logs, it is no secret.
_REQUEST_ID_PREFIX = secrets.token_hex(4)
_request_ids = itertools.count(1)


def _new_prefix_after_fork() -> None:  # a forked worker must not repeat its parent's ids
    global _REQUEST_ID_PREFIX, _request_ids
    _REQUEST_ID_PREFIX = secrets.token_hex(4)
    _request_ids = itertools.count(1)


os.register_at_fork(after_in_child=_new_prefix_after_fork)


def request_id_from(presented: bytes | None) -> str:
    """The client's `X-Request-ID` if it is sane, else a new one."""
    if presented is not None:
        candidate = presented.decode("latin-1")
        if _REQUEST_ID_OK.match(candidate):
            return candidate
    return f"{_REQUEST_ID_PREFIX}{next(_request_ids):08x}"


MAX_COOKIE_BYTES = 4096  # tessera's own cookies take under 1 KiB
MAX_HEADER_BYTES = 32768
ROUTE_KEY = "tessera.route"  # lean handlers name their route template here, for metrics
PRINCIPAL = "principal"
PRINCIPAL_ERROR = "principal_error"

_VARY = b"DNT, Sec-GPC"
SESSION_ENDING = frozenset({("POST", "/auth/logout"), ("POST", "/auth/logout-all"),
                            ("POST", "/me/deactivate"), ("DELETE", "/me")})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def untracked_path(path: str) -> bool:
    return path.rstrip("/") in UNTRACKED_PATHS


def principal_in(scope: Scope, *, attribute: bool = True) -> Principal | None:
    """The principal the edge found for this request (None: no valid token). A store failure
    it met is raised here, where a route needs the answer (503). The request is then the
    user's in the usage log, unless `attribute` is False or the route said otherwise."""
    state = scope.get("state", {})
    error = state.pop(PRINCIPAL_ERROR, None)
    if error is not None:
        raise error
    principal: Principal | None = state.get(PRINCIPAL)
    if principal is not None and attribute and state.get(USAGE_USER) is None:
        state[USAGE_USER] = principal.user_id
    return principal


class Edge:
    def __init__(self, app: ASGIApp, *, settings: Settings, metrics: Metrics,
                 usage: UsageRecorder) -> None:
        self.app = app
        self.metrics = metrics
        self.usage = usage
        self.max_body = settings.max_body_bytes
        self.session_cookie = settings.session_cookie.encode()
        self.csrf_cookie = settings.csrf_cookie.encode()
        self.cookie_names = frozenset({self.session_cookie, self.csrf_cookie,
                                       VISITOR_COOKIE.encode()})
        self.visitor_cookie: Callable[[], bytes] = visitor_set_cookie(settings)
        self.security_headers = [(b"x-content-type-options", b"nosniff"),
                                 (b"referrer-policy", b"no-referrer"),
                                 (b"x-frame-options", b"DENY")]
        if settings.cookie_secure:
            self.security_headers.append(
                (b"strict-transport-security", b"max-age=63072000; includeSubDomains"))
        self.checker: TokenChecker | None = None  # set once the lifespan has built the stores
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # nothing in tessera speaks WebSocket
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        presented_id = authorization = host = content_length = None
        opted_out = chunked = oversized = False
        cookies: dict[bytes, bytes] = {}
        total = 0
        for name, value in scope["headers"]:
            total += len(name) + len(value)
            if name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"cookie":
                if len(value) > MAX_COOKIE_BYTES:
                    oversized = True
                else:
                    parse_cookies(value, self.cookie_names, cookies)
            elif name in OPT_OUT_HEADERS:
                opted_out = opted_out or opts_out(name, value)
            elif name == b"host":
                if host is None:
                    host = value
            elif name == b"content-length":
                if content_length is None:
                    content_length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"x-request-id" and presented_id is None:
                presented_id = value
        oversized = oversized or total > MAX_HEADER_BYTES
        rid = request_id_from(presented_id)
        rid_token = request_id_var.set(rid)
        path: str = scope["path"]
        state: dict[str, Any] = scope.setdefault("state", {})
        state["cookies"] = cookies
        state[USAGE_USER] = None
        # A refused oversized request is tracked never: its token was not looked at.
        tracked = not opted_out and not oversized and untracked_path(path) is False
        has_visitor = VISITOR_COOKIE.encode() in cookies
        # The session-ending routes check their token even while Redis refuses writes, so
        # that their deletion is tried and, refused, kept for replay (stores/durability.py).
        ending = ending_sessions((scope["method"], path) in SESSION_ENDING)
        if not oversized:
            tracked = await self._authenticate(state, authorization, cookies) and tracked
        state[TRACKING] = tracked
        status = 0
        nbytes = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, nbytes
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = self._headers(message.get("headers", ()), state,
                                                   has_visitor, path, rid)
            elif message["type"] == "http.response.body":
                nbytes += len(message.get("body", b""))
                if not message.get("more_body", False):
                    self._record(scope, state, host, status, nbytes)
            await send(message)

        try:
            if oversized:
                await _problem(send_wrapper, 431, "request_header_fields_too_large",
                               "The request headers (or the Cookie header) are too large.")
                return
            declared = _declared_length(content_length)
            if declared is not None and (declared < 0 or declared > self.max_body):
                if declared < 0:
                    await _problem(send_wrapper, 400, "bad_request", "Invalid Content-Length.")
                else:
                    await _problem(send_wrapper, 413, "payload_too_large",
                                   f"The request body exceeds {self.max_body} bytes.")
                return
            if chunked or declared:
                receive = self._limited(receive)
            try:
                await self.app(scope, receive, send_wrapper)
            except BodyTooLarge:
                if status == 0:
                    await _problem(send_wrapper, 413, "payload_too_large",
                                   f"The request body exceeds {self.max_body} bytes.")
        finally:
            reset_ending_sessions(ending)
            request_id_var.reset(rid_token)
            self._measure(scope, status or 500, start)

    async def _authenticate(self, state: dict[str, Any], authorization: bytes | None,
                            cookies: dict[bytes, bytes]) -> bool:
        """Finds the request's principal (once, for the edge and the route); False when the
        user may not be tracked (restricted, objecting, or unknown because a store failed)."""
        if authorization is not None:
            scheme, _, value = authorization.decode("latin-1").partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else ""
            via_cookie = False
        else:
            token = cookies.get(self.session_cookie, b"").decode("latin-1")
            via_cookie = True
        if not token or self.checker is None:
            return True
        try:
            principal = await self.checker.check(token, via_cookie=via_cookie)
        except Exception as exc:  # a store failed: the route raises it (503); track nothing
            state[PRINCIPAL_ERROR] = exc
            return False
        state[PRINCIPAL] = principal
        # The usage event is the route's to attribute (`attribute_usage`), where it uses the
        # principal: a public route called with a session cookie logs nothing.
        return principal is None or principal.profile.tracking_allowed

    def _headers(self, raw: Any, state: dict[str, Any], has_visitor: bool, path: str,
                 rid: str) -> list[tuple[bytes, bytes]]:
        tracked = state.get(TRACKING, True)
        headers: list[tuple[bytes, bytes]] = []
        vary: list[bytes] = []
        present: set[bytes] = set()
        for name, value in raw:
            if name == b"vary":
                vary.append(value)
                continue
            if name == b"x-request-id":
                continue
            if name == b"set-cookie" and not tracked and \
                    cookie_name(value) not in ESSENTIAL_COOKIES:
                continue
            present.add(name)
            headers.append((name, value))
        headers.append((b"vary", b", ".join([*vary, _VARY])))
        headers.append((b"tk", b"T" if tracked else b"N"))
        if tracked and not has_visitor and not untracked_path(path):
            headers.append((b"set-cookie", self.visitor_cookie()))
        for name, value in self.security_headers:
            if name not in present:
                headers.append((name, value))
        headers.append((b"x-request-id", rid.encode()))
        return headers

    def _record(self, scope: Scope, state: dict[str, Any], host: bytes | None, status: int,
                nbytes: int) -> None:
        user_id = state.get(USAGE_USER)
        if not user_id or not state.get(TRACKING, True):
            return
        client = scope.get("client")
        self.usage.record(user_id=user_id, ip=client[0] if client else None,
                          method=scope["method"], path=scope["path"],
                          host=host.decode("latin-1") if host is not None else None,
                          status=status, nbytes=nbytes)

    def _measure(self, scope: Scope, status: int, start: float) -> None:
        """Requests and latency by route template (never by raw path: ids stay out)."""
        template = scope.get(ROUTE_KEY) or getattr(scope.get("route"), "path", None) \
            or "unmatched"
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        key = (method, template, status)
        series = self._series.get(key)
        if series is None:
            if len(self._series) > 4096:  # bounded: methods x templates x statuses
                self._series.clear()
            series = (self.metrics.requests.labels(key[0], template, str(status)),
                      self.metrics.latency.labels(key[0], template))
            self._series[key] = series
        series[0].inc()
        series[1].observe(time.perf_counter() - start)

    def _limited(self, receive: Receive) -> Receive:
        received = 0
        limit = self.max_body

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        return limited_receive


def _declared_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return -1


async def _problem(send: Send, status: int, code: str, detail: str) -> None:
    body = json.dumps(problem_body(status, code, detail)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": body})
