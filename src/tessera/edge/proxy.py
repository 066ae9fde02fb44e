"""Trusted reverse proxies: which peers' `X-Forwarded-*` headers tessera believes.

With `TESSERA_PROXY_HEADERS=true` (`tessera serve --proxy-headers`), uvicorn's
ProxyHeadersMiddleware gives every request its real client address from `X-Forwarded-For`
when the peer is in `TESSERA_FORWARDED_ALLOW_IPS`, so per-IP limits and the usage log see
clients, not the proxy. The direct peer is kept in the scope first, for GET /auth/check.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

PEER = "tessera.peer"


@lru_cache(maxsize=64)
def _networks(allowed: tuple[str, ...]) -> tuple[bool, tuple[ipaddress._BaseNetwork, ...]]:
    nets = []
    for entry in allowed:
        if entry == "*":
            return True, ()
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    return False, tuple(nets)


def trusted(address: str | None, allowed: Iterable[str]) -> bool:
    """Whether a peer address is one of the trusted proxies (exact addresses, networks in
    CIDR notation, or `*`)."""
    if not address:
        return False
    return _trusted(address, tuple(allowed))


@lru_cache(maxsize=4096)  # GET /auth/check asks once per request, mostly for the same peers
def _trusted(address: str, allowed: tuple[str, ...]) -> bool:
    anyone, nets = _networks(allowed)
    if anyone:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in nets)


def direct_peer(scope: Scope) -> str | None:
    """The address that connected to tessera (before any X-Forwarded-For rewriting)."""
    peer = scope.get(PEER)
    if peer is not None:
        return str(peer)
    client = scope.get("client")
    return str(client[0]) if client else None


class TrustedProxyMiddleware:
    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.inner = ProxyHeadersMiddleware(app, trusted_hosts=allowed)  # type: ignore[arg-type]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            scope[PEER] = client[0] if client else None
        await self.inner(scope, receive, send)  # type: ignore[arg-type]
