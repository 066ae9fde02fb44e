"""GET /auth/check: forward auth for reverse proxies (nginx `auth_request`, Traefik
`ForwardAuth`, Caddy `forward_auth`, Envoy `ext_authz`). README and docs/events.md show
the proxy configurations.

Lean on purpose (it is called once per request the proxy serves): the one token check
(`lookup_token`, as GET /me), no dependency solving, no body. The usage log (P4) records
the ORIGINAL request, whose method, host and path come from the proxy's `X-Forwarded-*`
headers when the peer is a trusted proxy (`TESSERA_FORWARDED_ALLOW_IPS`), and only when
tracking is allowed: the original request's `DNT` / `Sec-GPC` (the proxy passes its headers
on) and the user's restrictions decide. The edge middleware is told not to record the
check itself.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from tessera.api.deps import lookup_token, raise_handed_over
from tessera.edge.privacy import attribute_usage, forbid_tracking, opts_out
from tessera.edge.proxy import direct_peer, trusted
from tessera.errors import not_authenticated, problem_doc
from tessera.services import Tessera

router = APIRouter(tags=["auth"])

NO_STORE = {"Cache-Control": "no-store"}


def _token(request: Request, t: Tessera) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return value.strip() or None
    return request.cookies.get(t.settings.session_cookie) or None


def original_request(request: Request, t: Tessera) -> tuple[str | None, str, str, str | None]:
    """(client ip, method, path, host) of the request the proxy asks about; the check itself
    when the peer is not a trusted proxy. The query string is never kept (it may carry
    tokens or personal data)."""
    headers = request.headers
    peer = direct_peer(request.scope)
    client = request.scope.get("client")
    ip = client[0] if client else None
    if not trusted(peer, t.settings.forwarded_allow_ips):
        return ip, "GET", "/auth/check", headers.get("host")
    if not t.settings.proxy_headers and (forwarded_for := headers.get("x-forwarded-for")):
        ip = forwarded_for.rsplit(",", 1)[-1].strip() or ip  # as the proxy saw its client
    # Envoy's ext_authz (HTTP) sends the original method, and the original path after its
    # `path_prefix` (/auth/check/<path>).
    suffix = request.path_params.get("original")
    method = (headers.get("x-forwarded-method") or headers.get("x-original-method")
              or request.method).upper()
    uri = (headers.get("x-forwarded-uri") or headers.get("x-original-uri")
           or ("/" + suffix if suffix is not None else "/"))
    host = headers.get("x-forwarded-host") or headers.get("host")
    return ip, method, uri.split("?", 1)[0].split("#", 1)[0], host


@router.get("/auth/check", status_code=200, response_class=Response,
            responses={200: {"description": "Authenticated: identity in `X-Auth-User-Id`, "
                             "`X-Auth-Session-Id` (and `X-Auth-Amr`)."},
                       **problem_doc({401: "not_authenticated"})})
async def check(request: Request) -> Response:
    """Forward auth: 200 with identity headers for a valid token (bearer or session cookie),
    else 401 `not_authenticated`."""
    t: Tessera = request.app.state.tessera
    token = _token(request, t)
    if token is None or len(token) > 4096:
        raise not_authenticated()
    raise_handed_over(request)
    principal = await lookup_token(t, token)
    if principal is None or principal.profile is None:
        raise not_authenticated()
    headers = {**NO_STORE, "X-Auth-User-Id": principal.user_id,
               "X-Auth-Session-Id": principal.sid}
    amr = (principal.claims or {}).get("amr")
    if isinstance(amr, list) and amr:
        headers["X-Auth-Amr"] = ",".join(str(a) for a in amr)
    scope = request.scope
    if not principal.profile["tracking_allowed"]:
        forbid_tracking(scope)
    elif not any(opts_out(name, value) for name, value in scope["headers"]):
        ip, method, path, host = original_request(request, t)
        t.usage.record(user_id=principal.user_id, ip=ip, method=method, path=path, host=host,
                       status=200, nbytes=0)
    attribute_usage(scope, "")  # recorded above (or not at all): not again as /auth/check
    return Response(status_code=200, headers=headers)


# Envoy ext_authz (HTTP service) asks with the original method, at `path_prefix` + the
# original path: the same check.
router.add_api_route("/auth/check/{original:path}", check, include_in_schema=False,
                     methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
router.add_api_route("/auth/check", check, include_in_schema=False,
                     methods=["HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
