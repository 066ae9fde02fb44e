"""Small pure-ASGI middlewares: request id, security headers, request body limit."""

from __future__ import annotations

import contextvars
import itertools
import os
import re
import secrets

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.errors import problem_body

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


def security_headers(*, hsts: bool) -> list[tuple[bytes, bytes]]:
    headers = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
               (b"x-frame-options", b"DENY")]
    if hsts:
        headers.append((b"strict-transport-security", b"max-age=63072000; includeSubDomains"))
    return headers


class RequestIdMiddleware:
    """Honours a sane `X-Request-ID` or makes one; echoes it and exposes it to the logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                presented = value
                break
        rid = request_id_from(presented)
        token = request_id_var.set(rid)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            request_id_var.reset(token)


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self.headers = [(name.decode(), value.decode())
                        for name, value in security_headers(hsts=hsts)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers:
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_wrapper)


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 `payload_too_large` for bodies over the limit, before they are read whole."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await _send_413(send, self.max_bytes) if declared > 0 else await _send_400(send)
                    return
                break
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        except BodyTooLarge:
            if not started:
                await _send_413(send, self.max_bytes)


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": body})


async def _send_413(send: Send, limit: int) -> None:
    import json

    body = json.dumps(problem_body(413, "payload_too_large",
                                   f"The request body exceeds {limit} bytes.")).encode()
    await _send_json(send, 413, body)


async def _send_400(send: Send) -> None:
    import json

    body = json.dumps(problem_body(400, "bad_request", "Invalid Content-Length.")).encode()
    await _send_json(send, 400, body)


class HeaderLimitMiddleware:
    """431 for oversized headers, before anything parses them: cookie unquoting is quadratic
    on CPython before 3.11.10/3.12.6 (CVE-2024-7592), and the HTTP parser sets no cap."""

    MAX_COOKIE_BYTES = 4096  # tessera's own cookies take under 1 KiB
    MAX_HEADER_BYTES = 32768

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            total = 0
            for name, value in scope["headers"]:
                total += len(name) + len(value)
                if (name == b"cookie" and len(value) > self.MAX_COOKIE_BYTES) \
                        or total > self.MAX_HEADER_BYTES:
                    import json

                    body = json.dumps(problem_body(
                        431, "request_header_fields_too_large",
                        "The request headers (or the Cookie header) are too large.")).encode()
                    await _send_json(send, 431, body)
                    return
        await self.app(scope, receive, send)
