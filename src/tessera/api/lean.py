"""The endpoints other services and proxies call on every request they serve, written once
each as plain ASGI handlers: `GET /me` (bearer or cookie), `POST /auth/introspect`,
`GET /auth/check` (api/forward.py), `GET /healthz`, and the second login step
`POST /auth/login/mfa` (api/mfa.py). FastAPI's routing and dependency solving cost more
than their own work, so they skip it; they are declared in the OpenAPI schema like every
other route (`OPENAPI`), and answer through the same edge (privacy headers, usage log,
metrics) and the same problem rendering (errors.py).

A lean handler names the collaborators it uses as keyword parameters, as a route names its
dependencies; `handlers` is the one place they are taken from the lifespan's holder, as
api/deps.py is for FastAPI's routes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any
from urllib.parse import parse_qs

from pydantic import SecretStr
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tessera.api import forward, mfa
from tessera.api.clients import require_service_key
from tessera.api.raw import json_response
from tessera.domain.auth import MAX_TOKEN_LENGTH, TokenChecker
from tessera.domain.policy import PolicyCache, PolicyState, must_consent
from tessera.domain.profiles import Profile
from tessera.edge.edge import ROUTE_KEY, principal_in
from tessera.errors import (
    PROBLEM_SCHEMA,
    BodyTooLarge,
    Problem,
    is_unavailable,
    not_authenticated,
    problem_response,
    unavailable_response,
)
from tessera.services import Tessera
from tessera.stores.memo import Memo
from tessera.stores.sessions import SessionRecord

log = logging.getLogger("tessera.lean")

Handler = Callable[[Scope, Receive], Awaitable[ASGIApp]]
_JSON = "application/json"


async def get_me(scope: Scope, receive: Receive) -> ASGIApp:
    principal = principal_in(scope)
    if principal is None:
        raise not_authenticated()
    # Served from the profile cached in Redis: no database read on this hot path.
    return json_response(principal.profile.me_body)


async def healthz(scope: Scope, receive: Receive) -> ASGIApp:
    return json_response(b'{"status":"ok"}')


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # the client left mid-body
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def introspect(scope: Scope, receive: Receive, *, service_keys: Sequence[SecretStr],
                     auth: TokenChecker, policy: PolicyCache) -> ASGIApp:
    """RFC 7662. Active while the session exists: the same check every endpoint makes."""
    body = await _read_body(receive)
    if body is None:
        return Response(status_code=400)
    # A urlencoded body of a few fields, parsed here: cheaper than the form machinery.
    try:
        fields = parse_qs(body.decode(), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        raise Problem("malformed_body", "The body must be a urlencoded form.") from None
    require_service_key(scope, service_keys, fields)
    tokens = fields.get("token")
    if not tokens or not tokens[0]:
        raise Problem("invalid_request", "The form field `token` is required (RFC 7662).")
    token = tokens[0]
    principal = await auth.check(token) if len(token) <= MAX_TOKEN_LENGTH else None
    if principal is None:
        return json_response(b'{"active":false}')
    state = await policy.get()
    # The answer is a function of the token (its claims), its session record, the profile
    # and the policy state: the memos hand back the same objects while none of them changed,
    # so the rendered body is kept beside them.
    known = _introspected.get(token)
    if known is not None and known[0] is principal.session and known[1] is principal.profile \
            and known[2] is state:
        return json_response(known[3])
    raw = principal.claims
    # Rendered as Starlette's JSONResponse renders (compact, UTF-8), without building one.
    body = json.dumps({
        "active": True, "sub": principal.user_id, "sid": principal.sid, "exp": raw.get("exp"),
        "iat": raw.get("iat"), "iss": raw.get("iss"), "aud": raw.get("aud"),
        "jti": raw.get("jti"), "token_type": "Bearer",
        "policy_accepted": not must_consent(principal.profile.policy_seq, state),
        "amr": raw.get("amr", ["pwd"]), "auth_time": raw.get("auth_time", raw.get("iat")),
        "email_verified": bool(principal.profile.me.get("email_verified")),
    }, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    _introspected.put(token, (principal.session, principal.profile, state, body))
    return json_response(body)


# token -> (session record, profile, policy state, body) of its last active answer
_introspected: Memo[str, tuple[SessionRecord, Profile, PolicyState, bytes]] = Memo()


# The lean endpoints, (method, path); `handlers` builds each one's handler.
ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/me"), ("GET", forward.PATH), ("POST", "/auth/introspect"), ("GET", "/healthz"),
    ("POST", mfa.LOGIN_MFA_PATH))


def handlers(t: Tessera) -> dict[tuple[str, str], Handler]:
    """Each lean endpoint's handler with the collaborators it names, taken from the
    lifespan's holder here and nowhere else."""
    built: dict[tuple[str, str], Handler] = {
        ("GET", "/me"): get_me,
        ("GET", forward.PATH): partial(forward.check, settings=t.settings, usage=t.usage),
        ("POST", "/auth/introspect"): partial(introspect, service_keys=t.settings.service_keys,
                                              auth=t.auth, policy=t.policy),
        ("GET", "/healthz"): healthz,
        ("POST", mfa.LOGIN_MFA_PATH): partial(
            mfa.login_mfa, settings=t.settings, db_factory=t.db_factory, factors=t.factors,
            metrics=t.metrics, logins=t.logins, csrf_key=t.csrf_key,
            audit_trail=t.audit_trail),
    }
    assert set(built) == set(ROUTES)
    return built


_ROUTE_SET = frozenset(ROUTES)


class LeanRoutes:
    """Dispatches the few lean endpoints; everything else goes to FastAPI's stack."""

    def __init__(self, app: ASGIApp, tessera: Callable[[], Tessera],
                 other_paths: set[str]) -> None:
        self.app = app
        self.tessera = tessera
        self._built_for: Tessera | None = None  # the holder `_handlers` were built from
        self._handlers: dict[tuple[str, str], Handler] = {}
        # Paths only a lean handler serves: another method there is 405, as FastAPI says it.
        self.allow: dict[str, str] = {}
        for _method, path in ROUTES:
            if path not in other_paths:
                methods = {m for m, p in ROUTES if p == path}
                self.allow[path] = ", ".join(sorted(methods))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            key: tuple[str, str] | None = (scope["method"], path)
            if key not in _ROUTE_SET:
                key = None
                if path == forward.PATH or path.startswith(forward.PREFIX):
                    key = ("GET", forward.PATH)  # any method: Envoy asks with the original one
            if key is not None:
                scope[ROUTE_KEY] = forward.PATH if path.startswith(forward.PREFIX) else path
                await (await self._answer(key, scope, receive))(scope, receive, send)
                return
            allowed = self.allow.get(path)
            if allowed is not None:
                await problem_response(405, "method_not_allowed", "Method Not Allowed",
                                       {"Allow": allowed})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _handler(self, key: tuple[str, str]) -> Handler:
        t = self.tessera()  # built by the lifespan: a new holder (a restart), new handlers
        if t is not self._built_for:
            self._handlers, self._built_for = handlers(t), t
        return self._handlers[key]

    async def _answer(self, key: tuple[str, str], scope: Scope, receive: Receive) -> ASGIApp:
        try:
            return await self._handler(key)(scope, receive)
        except Problem as problem:
            return problem_response(problem.status, problem.code, problem.detail,
                                    problem.headers, **problem.extra)
        except BodyTooLarge:  # a streamed body past the limit (the edge's receive)
            return problem_response(413, "payload_too_large", "The request body is too large.")
        except Exception as exc:
            if is_unavailable(exc):
                log.warning("backing store unavailable on %s: %s", scope["path"],
                            type(exc).__name__)
                return unavailable_response()
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            return problem_response(500, "internal_error",
                                    "The server could not complete the request.")


def _problems(*statuses: tuple[int, str]) -> dict[str, Any]:
    return {str(status): {"description": description, "content": {
        "application/problem+json": {"schema": PROBLEM_SCHEMA}}}
        for status, description in statuses}


_UNAVAILABLE = (503, "unavailable: a backing service is down")

# The lean endpoints' OpenAPI operations (merged into the schema in api/openapi.py).
OPENAPI: dict[str, dict[str, Any]] = {
    "/me": {"get": {
        "tags": ["me"], "summary": "Get Me", "operationId": "get_me",
        "description": "The logged-in user's account, served from the profile cached beside "
                       "the session (no database read).",
        "security": [{"OAuth2PasswordBearer": []}],
        "responses": {"200": {"description": "the account", "content": {_JSON: {"schema": {
            "type": "object", "properties": {
                "id": {"type": "string"}, "email": {"type": "string"},
                "created_at": {"type": "string", "format": "date-time"},
                "is_active": {"type": "boolean"}, "is_admin": {"type": "boolean"},
                "policy_version": {"type": ["string", "null"]},
                "consents": {"type": "object"}, "restrictions": {"type": "object"}}}}}},
            **_problems((401, "not_authenticated"), _UNAVAILABLE)}}},
    "/auth/introspect": {"post": {
        "tags": ["auth"], "summary": "Introspect", "operationId": "introspect",
        "description": "RFC 7662 token introspection for services. Client authentication: "
                       "`Authorization: Bearer <service key>`, HTTP Basic (any client id, a "
                       "service key as the secret) or `client_id`/`client_secret` form fields.",
        "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
            "schema": {"type": "object", "required": ["token"], "properties": {
                "token": {"type": "string", "maxLength": MAX_TOKEN_LENGTH},
                "token_type_hint": {"type": "string"}, "client_id": {"type": "string"},
                "client_secret": {"type": "string"}}}}}},
        "responses": {"200": {"description": "`{active: true, sub, sid, ...}` or exactly "
                                             "`{\"active\": false}`",
                              "content": {_JSON: {"schema": {"type": "object"}}}},
                      **_problems((400, "invalid_request (no token) or malformed_body"),
                                  (401, "invalid_client"), _UNAVAILABLE)}}},
    **forward.OPENAPI,
    **mfa.LOGIN_MFA_OPENAPI,
    "/healthz": {"get": {
        "tags": ["operations"], "summary": "Healthz", "operationId": "healthz",
        "responses": {"200": {"description": "the process runs", "content": {_JSON: {
            "schema": {"type": "object", "properties": {"status": {"const": "ok"}}}}}}}}},
}
