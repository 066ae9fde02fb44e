"""GET /auth/check: forward auth for reverse proxies (nginx `auth_request`, Traefik
`ForwardAuth`, Caddy `forward_auth`, Envoy `ext_authz`). README and docs/events.md show
the proxy configurations.

A lean handler (api/lean.py dispatches it): it is called once per request the proxy
serves, and answers from the principal the edge already found with the one token check, as
GET /me does. The usage log (P4) records the ORIGINAL request, whose method, host and path
come from the proxy's `X-Forwarded-*` headers when the peer is a trusted proxy
(`TESSERA_FORWARDED_ALLOW_IPS`), and only when tracking is allowed: the original request's
`DNT` / `Sec-GPC` (the proxy passes its headers on) and the user's restrictions decide, as
the edge decided them. The edge is told not to record the check itself.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope

from tessera.api.raw import RawResponse
from tessera.config import Settings
from tessera.edge.edge import principal_in
from tessera.edge.privacy import TRACKING, attribute_usage
from tessera.edge.proxy import direct_peer, trusted
from tessera.errors import PROBLEM_SCHEMA, not_authenticated
from tessera.stores.usage import UsageRecorder

PATH = "/auth/check"
PREFIX = PATH + "/"


# The request headers original_request reads: the first of each, in one pass.
_WANTED = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-method", b"x-original-method",
                     b"x-forwarded-uri", b"x-original-uri", b"x-forwarded-host"})


def _headers(scope: Scope) -> dict[bytes, str]:
    found: dict[bytes, str] = {}
    for key, value in scope["headers"]:
        if key in _WANTED and key not in found:
            found[key] = value.decode("latin-1")
    return found


def original_request(scope: Scope, settings: Settings,
                     ) -> tuple[str | None, str, str, str | None]:
    """(client ip, method, path, host) of the request the proxy asks about; the check itself
    when the peer is not a trusted proxy. The query string is never kept (it may carry
    tokens or personal data)."""
    client = scope.get("client")
    ip = client[0] if client else None
    headers = _headers(scope)
    host = headers.get(b"host")
    if not trusted(direct_peer(scope), settings.forwarded_allow_ips):
        return ip, "GET", PATH, host
    forwarded_for = headers.get(b"x-forwarded-for")
    if not settings.proxy_headers and forwarded_for:
        ip = forwarded_for.rsplit(",", 1)[-1].strip() or ip  # as the proxy saw its client
    # Envoy's ext_authz (HTTP) sends the original method, and the original path after its
    # `path_prefix` (/auth/check/<path>).
    path: str = scope["path"]
    suffix = path[len(PATH):] if path.startswith(PATH + "/") else None
    method = (headers.get(b"x-forwarded-method") or headers.get(b"x-original-method")
              or scope["method"]).upper()
    uri = (headers.get(b"x-forwarded-uri") or headers.get(b"x-original-uri")
           or (suffix or "/"))
    host = headers.get(b"x-forwarded-host") or host
    return ip, method[:16], uri.split("?", 1)[0].split("#", 1)[0], host


async def check(scope: Scope, receive: Receive, *, settings: Settings,
                usage: UsageRecorder) -> ASGIApp:
    """Forward auth: 200 with identity headers for a valid token (bearer or session cookie),
    else 401 `not_authenticated`."""
    principal = principal_in(scope, attribute=False)
    if principal is None:
        raise not_authenticated()
    # As `Response(status_code=200, headers={Cache-Control, X-Auth-*})` sends them.
    headers = [(b"cache-control", b"no-store"),
               (b"x-auth-user-id", principal.user_id.encode("latin-1")),
               (b"x-auth-session-id", principal.sid.encode("latin-1"))]
    amr: Any = principal.claims.get("amr")
    if isinstance(amr, list) and amr:
        headers.append((b"x-auth-amr", ",".join(str(a) for a in amr).encode("latin-1")))
    headers.append((b"content-length", b"0"))
    if scope.get("state", {}).get(TRACKING, False):
        ip, method, path, host = original_request(scope, settings)
        usage.record(user_id=principal.user_id, ip=ip, method=method, path=path, host=host,
                       status=200, nbytes=0)
    attribute_usage(scope, "")  # recorded above (or not at all): not again as /auth/check
    return RawResponse(200, headers)


OPENAPI: dict[str, dict[str, Any]] = {PATH: {"get": {
    "tags": ["auth"], "summary": "Check", "operationId": "forward_auth_check",
    "description": "Forward auth for reverse proxies (nginx `auth_request`, Traefik "
                   "`ForwardAuth`, Caddy `forward_auth`, Envoy `ext_authz` at "
                   "`/auth/check/<original path>` with any method). The original request's "
                   "method, host and URI come from `X-Forwarded-Method`, `X-Forwarded-Host`, "
                   "`X-Forwarded-Uri` (or `X-Original-URI`), trusted only from "
                   "`TESSERA_FORWARDED_ALLOW_IPS`.",
    "security": [{"OAuth2PasswordBearer": []}],
    "responses": {
        "200": {"description": "Authenticated: identity in `X-Auth-User-Id`, "
                               "`X-Auth-Session-Id` (and `X-Auth-Amr`)."},
        "401": {"description": "not_authenticated", "content": {"application/problem+json": {
            "schema": PROBLEM_SCHEMA}}}}}}}
