"""The two calls other services make on every request they serve, on a lean path.

`GET /me` with a bearer token and `POST /auth/introspect` cost, through FastAPI's router,
dependency solving and six middlewares, about five times what their own work costs (one
batched Redis read, a hash compare, a JSON answer; docs/performance.md). `TesseraApp`
answers them here instead when the request is the plain, successful case, with the very
bytes the full stack would send: the same status, body and headers (`Tk`, `Vary`, the
`visitor` cookie, security headers, `X-Request-ID`), the same usage event and the same
metrics. Anything else (no or a bad token, a session whose profile is not cached, a
cross-origin request, oversized headers or body, a query string, a store that fails) is
handed, untouched, to the full stack, which answers it as before; tests/test_fastpath.py
checks both paths answer alike. `TESSERA_FAST_PATH=false` turns this off.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from tessera.api.deps import check_token, hand_over_failure
from tessera.domain.policy import must_consent
from tessera.edge.middleware import HeaderLimitMiddleware, request_id_from, security_headers
from tessera.edge.privacy import OPT_OUT_HEADERS, carries_visitor, opts_out, visitor_set_cookie
from tessera.services import Tessera

ASGICall = Callable[[Scope, Receive, Send], Awaitable[None]]

ME_PATH = "/me"
INTROSPECT_PATH = "/auth/introspect"
FAST_PATHS = frozenset({ME_PATH, INTROSPECT_PATH})

_MAX_TOKEN_LENGTH = 4096


class _Request:
    """What one pass over the request headers found."""

    __slots__ = ("authorization", "request_id", "opted_out", "has_visitor", "host",
                 "content_length", "fall_back")

    def __init__(self, scope: Scope, cors: bool) -> None:
        self.authorization: bytes | None = None
        self.request_id: bytes | None = None
        self.opted_out = False
        self.has_visitor = False
        self.host: bytes | None = None
        self.content_length: bytes | None = None
        self.fall_back = bool(scope.get("query_string"))
        total = 0
        for name, value in scope["headers"]:
            total += len(name) + len(value)
            if name == b"authorization":
                if self.authorization is None:
                    self.authorization = value
            elif name == b"x-request-id":
                if self.request_id is None:
                    self.request_id = value
            elif name in OPT_OUT_HEADERS:
                if opts_out(name, value):
                    self.opted_out = True
            elif name == b"cookie":
                if len(value) > HeaderLimitMiddleware.MAX_COOKIE_BYTES:
                    self.fall_back = True
                elif carries_visitor(value):
                    self.has_visitor = True
            elif name == b"host":
                if self.host is None:
                    self.host = value
            elif name == b"content-length":
                if self.content_length is None:
                    self.content_length = value
            elif name == b"transfer-encoding" or (cors and name == b"origin"):
                self.fall_back = True  # chunked bodies, CORS: the full stack's business
        if total > HeaderLimitMiddleware.MAX_HEADER_BYTES:
            self.fall_back = True

    def bearer(self) -> str | None:
        if self.authorization is None:
            return None
        scheme, _, value = self.authorization.decode("latin-1").partition(" ")
        value = value.strip()
        return value if scheme.lower() == "bearer" and value else None


class FastPath:
    """Built once the lifespan has made the app's state (`Tessera`)."""

    def __init__(self, t: Tessera) -> None:
        self.t = t
        settings = t.settings
        self.cors = bool(settings.cors_origins)
        self.max_body = settings.max_body_bytes
        self.service_keys = [k.get_secret_value().encode() for k in settings.service_keys]
        self.secure_headers = security_headers(hsts=settings.cookie_secure)
        self.visitor_cookie = visitor_set_cookie(settings)
        # The privacy middleware's Vary, to which Starlette's CORS middleware adds Origin.
        self.vary = b"DNT, Sec-GPC, Origin" if self.cors else b"DNT, Sec-GPC"
        metrics = t.metrics
        self.me_requests = metrics.requests.labels("GET", ME_PATH, "200")
        self.me_latency = metrics.latency.labels("GET", ME_PATH)
        self.introspect_requests = metrics.requests.labels("POST", INTROSPECT_PATH, "200")
        self.introspect_latency = metrics.latency.labels("POST", INTROSPECT_PATH)
        self.served = 0  # requests answered here (for tests and debugging)

    async def __call__(self, scope: Scope, receive: Receive, send: Send, full: ASGICall) -> None:
        start = time.perf_counter()
        request = _Request(scope, self.cors)
        if request.fall_back or scope.get("root_path"):
            await full(scope, receive, send)
        elif scope["path"] == ME_PATH and scope["method"] == "GET":
            await self._me(scope, receive, send, full, request, start)
        elif scope["path"] == INTROSPECT_PATH and scope["method"] == "POST":
            await self._introspect(scope, receive, send, full, request, start)
        else:
            await full(scope, receive, send)

    async def _me(self, scope: Scope, receive: Receive, send: Send, full: ASGICall,
                  request: _Request, start: float) -> None:
        token = request.bearer()
        if request.content_length not in (None, b"0"):
            await full(scope, receive, send)  # a body on a GET: the body limit's business
            return
        try:
            found = await check_token(self.t, token) if token else None
        except Exception as exc:  # a store failed: the full stack answers 503 `unavailable`
            found = None
            hand_over_failure(scope, exc)
        if found is None or found[2] is None or not found[2]["is_active"]:
            await full(scope, receive, send)  # 401, or the profile is loaded there
            return
        user_id, profile = found[1].user_id, found[2]
        tracked = not request.opted_out and bool(profile["tracking_allowed"])
        body = json.dumps(profile["me"]).encode()
        await self._answer(send, request, body, tracked)
        if tracked:
            client = scope.get("client")
            host = request.host.decode("latin-1") if request.host is not None else None
            self.t.usage.record(user_id=user_id, ip=client[0] if client else None,
                                method="GET", path=ME_PATH, host=host, status=200,
                                nbytes=len(body))
        self.me_requests.inc()
        self.me_latency.observe(time.perf_counter() - start)

    async def _introspect(self, scope: Scope, receive: Receive, send: Send, full: ASGICall,
                          request: _Request, start: float) -> None:
        if not self._service_key_ok(request.bearer()) or not self._length_ok(request):
            await full(scope, receive, send)  # 401 invalid_client, 400, 413
            return
        body, messages = await _read_body(receive)
        if messages[-1]["type"] == "http.disconnect":
            return  # the client left mid-body: nobody to answer
        answer: dict[str, Any] | None = {"active": False}
        try:
            fields = parse_qs(body.decode(), max_num_fields=4)
        except (UnicodeDecodeError, ValueError):
            answer = None  # 400 malformed_body
        else:
            token = fields.get("token", [""])[0]
            try:
                answer = await self._introspection(token)
            except Exception as exc:  # a store failed: the full stack answers 503 `unavailable`
                answer = None
                hand_over_failure(scope, exc)
        if answer is None:
            await full(scope, _replay(messages, receive), send)
            return
        # As Starlette's JSONResponse renders it.
        payload = json.dumps(answer, ensure_ascii=False, allow_nan=False, indent=None,
                             separators=(",", ":")).encode()
        await self._answer(send, request, payload, not request.opted_out)
        self.introspect_requests.inc()
        self.introspect_latency.observe(time.perf_counter() - start)

    async def _introspection(self, token: str) -> dict[str, Any] | None:
        """RFC 7662's answer, as `auth.introspect` gives it; None: the profile is not cached."""
        found = await check_token(self.t, token) if len(token) <= _MAX_TOKEN_LENGTH else None
        if found is None:
            return {"active": False}
        claims, record, profile = found
        if profile is None:
            return None
        if not profile["is_active"]:
            return {"active": False}
        raw = claims.raw
        return {
            "active": True, "sub": record.user_id, "sid": record.sid, "exp": raw.get("exp"),
            "iat": raw.get("iat"), "iss": raw.get("iss"), "aud": raw.get("aud"),
            "jti": raw.get("jti"), "token_type": "Bearer",
            "policy_accepted": not must_consent(profile["policy_seq"], await self.t.policy.get()),
            "email_verified": bool(profile["me"].get("email_verified")),
        }

    def _service_key_ok(self, presented: str | None) -> bool:
        if not presented:
            return False
        ok = False
        for key in self.service_keys:  # no early exit: every key is compared
            ok |= hmac.compare_digest(presented.encode(), key)
        return ok

    def _length_ok(self, request: _Request) -> bool:
        if request.content_length is None:
            return False
        try:
            declared = int(request.content_length)
        except ValueError:
            return False
        return 0 <= declared <= self.max_body

    async def _answer(self, send: Send, request: _Request, body: bytes, tracked: bool) -> None:
        headers = [
            (b"cache-control", b"no-store"),
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            (b"vary", self.vary),
            (b"tk", b"T" if tracked else b"N"),
        ]
        if tracked and not request.has_visitor:
            headers.append((b"set-cookie", self.visitor_cookie()))
        headers.extend(self.secure_headers)
        headers.append((b"x-request-id", request_id_from(request.request_id).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.served += 1


async def _read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks), messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that gives the messages already read again, then the rest."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


class TesseraApp(FastAPI):
    """FastAPI, with the fast path in front of its stack (`fast_path` is set by the lifespan)."""

    fast_path: FastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_path
        if fast is not None and scope["type"] == "http" and scope["path"] in FAST_PATHS:
            await fast(scope, receive, send, super().__call__)
            return
        await super().__call__(scope, receive, send)
