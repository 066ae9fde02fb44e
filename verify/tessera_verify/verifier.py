"""TesseraVerifier: check tessera's access tokens in another service.

Locally, against the published keys (JWKS, cached; fetched again, at most every
`jwks_min_refresh_seconds`, when a token names a key not seen yet), optionally confirmed
by introspection, and kept current by the revocation feed: sessions deleted on tessera
(logout, logout-all, password change, deactivation) are remembered until their tokens
expire, so a logged-out token is refused here within a second without a call per request.

Imports only PyJWT and httpx (and FastAPI, with the `fastapi` extra): no tessera server code.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import httpx
import jwt

try:  # the `fastapi` extra: `Depends(verifier)`; without it, `await verifier.verify(token)`
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
except ImportError:  # pragma: no cover - checked by .ci/wheel-check
    HAS_FASTAPI = False
else:
    HAS_FASTAPI = True

log = logging.getLogger("tessera_verify")

REQUIRED_CLAIMS = ("iss", "aud", "sub", "sid", "iat", "exp", "jti")
MAX_TOKEN_LENGTH = 4096
JWKS_PATH = "/.well-known/jwks.json"
INTROSPECT_PATH = "/auth/introspect"
REVOCATIONS_PATH = "/auth/revocations"

Introspection = Literal[False, True, "fallback"]


class TokenRejected(Exception):
    """The token is not acceptable: malformed, badly signed, expired, foreign or revoked."""


class VerifierUnavailable(Exception):
    """tessera could not be asked (keys or introspection), so the token cannot be judged."""


@dataclass(frozen=True)
class Claims:
    """A verified token's claims. `policy_accepted` is known only after introspection."""

    sub: str
    sid: str
    iss: str
    aud: str
    iat: int
    exp: int
    jti: str
    kid: str
    policy_accepted: bool | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # How the user authenticated (RFC 8176: pwd, otp, hwk, user, mfa) and when (epoch s).
    # Tokens from before tessera had second factors say nothing: a password, at `iat`.
    amr: tuple[str, ...] = ("pwd",)
    auth_time: int | None = None

    @property
    def mfa(self) -> bool:
        """Two factors were used (a password and a code, or a user-verifying passkey)."""
        return "mfa" in self.amr


_bearer = (HTTPBearer(auto_error=False, description="An access token issued by tessera")
           if HAS_FASTAPI else None)


class TesseraVerifier:
    """Verifies tessera tokens; also a FastAPI dependency: `Annotated[Claims, Depends(v)]`.

    base_url      tessera's address; the JWKS, introspection and feed paths hang off it
    jwks_url      the JWKS alone, for signature checks without base_url
    service_key   one of tessera's TESSERA_SERVICE_KEYS: needed to introspect and to follow
                  the revocation feed
    introspect    False: local checks only; True: also ask tessera on every call;
                  "fallback": ask tessera only while the revocation feed is not connected
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        jwks_url: str | None = None,
        issuer: str = "tessera",
        audience: str = "tessera",
        service_key: str | None = None,
        introspect: Introspection = False,
        jwks_cache_seconds: float | None = None,
        jwks_min_refresh_seconds: float = 10.0,
        leeway_seconds: float = 0.0,
        timeout_seconds: float = 5.0,
        feed_read_timeout_seconds: float = 45.0,
        reconnect_min_seconds: float = 0.1,
        reconnect_max_seconds: float = 30.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if base_url is None and jwks_url is None:
            raise ValueError("give base_url (tessera's address) or jwks_url")
        base = base_url.rstrip("/") if base_url else None
        self.jwks_url = jwks_url or f"{base}{JWKS_PATH}"
        self.introspect_url = f"{base}{INTROSPECT_PATH}" if base else None
        self.revocations_url = f"{base}{REVOCATIONS_PATH}" if base else None
        if introspect and not (self.introspect_url and service_key):
            raise ValueError("introspection needs base_url and service_key")
        self.issuer = issuer
        self.audience = audience
        self.service_key = service_key
        self.introspect: Introspection = introspect
        self.jwks_cache_seconds = jwks_cache_seconds
        self.jwks_min_refresh_seconds = jwks_min_refresh_seconds
        self.leeway_seconds = leeway_seconds
        self.timeout_seconds = timeout_seconds
        self.feed_read_timeout_seconds = feed_read_timeout_seconds
        self.reconnect_min_seconds = reconnect_min_seconds
        self.reconnect_max_seconds = reconnect_max_seconds

        self._client = http_client
        self._owns_client = http_client is None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._keys_etag: str | None = None
        self._keys_fresh_until = 0.0
        self._keys_fetched_at = -1e18
        self._keys_lock = asyncio.Lock()
        self._revoked: dict[str, int] = {}
        self._revoked_by_exp: list[tuple[int, str]] = []
        self._follower: asyncio.Task[None] | None = None
        self._feed_connected = asyncio.Event()
        self.feed_connections = 0  # how many times the feed (re)connected

    # --- the dependency ------------------------------------------------------------------

    async def __call__(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Claims:
        if credentials is None:
            raise HTTPException(401, "Not authenticated", headers={"WWW-Authenticate": "Bearer"})
        try:
            return await self.verify(credentials.credentials)
        except TokenRejected:
            raise HTTPException(401, "Invalid or expired token", headers={
                "WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
        except VerifierUnavailable:
            raise HTTPException(503, "Token verification is unavailable",
                                headers={"Retry-After": "1"}) from None

    def require(self, *, mfa: bool = False) -> Callable[..., Awaitable[Claims]]:
        """A dependency that also demands how the user logged in:
        `Depends(verifier.require(mfa=True))` answers 403 unless two factors were used
        (`"mfa"` in the token's `amr`)."""

        async def requirement(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ) -> Claims:
            claims = await self(credentials)
            if mfa and not claims.mfa:
                raise HTTPException(403, "This needs a login with a second factor.",
                                    headers={"WWW-Authenticate": 'Bearer error='
                                             '"insufficient_user_authentication", '
                                             'acr_values="mfa"'})
            return claims

        return requirement

    # --- verification --------------------------------------------------------------------

    async def verify(self, token: str) -> Claims:
        """The token's claims, or TokenRejected / VerifierUnavailable."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise TokenRejected("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise TokenRejected("malformed token") from None
        kid = header.get("kid")
        if header.get("alg") != "EdDSA" or header.get("typ") != "at+jwt" or not isinstance(
                kid, str):
            raise TokenRejected("not a tessera access token")
        key = await self._key(kid)
        try:
            payload = jwt.decode(token, key.key, algorithms=["EdDSA"], issuer=self.issuer,
                                 audience=self.audience, leeway=self.leeway_seconds,
                                 options={"require": list(REQUIRED_CLAIMS)})
        except jwt.InvalidTokenError as exc:
            raise TokenRejected(str(exc)) from None
        claims = _claims(payload, kid)
        if self.is_revoked(claims.sid):
            raise TokenRejected("session ended")
        if self.introspect is True or (self.introspect == "fallback" and not self.feed_live):
            claims = await self._introspect(token, claims)
        return claims

    def is_revoked(self, sid: str) -> bool:
        return sid in self._revoked

    def revoke(self, sid: str, exp: int) -> None:
        """Remember that a session ended, until its token would have expired anyway."""
        now = time.time()
        while self._revoked_by_exp and self._revoked_by_exp[0][0] + self.leeway_seconds < now:
            _, old = heapq.heappop(self._revoked_by_exp)
            self._revoked.pop(old, None)
        if exp + self.leeway_seconds >= now and sid not in self._revoked:
            self._revoked[sid] = exp
            heapq.heappush(self._revoked_by_exp, (exp, sid))

    @property
    def revoked_count(self) -> int:
        return len(self._revoked)

    # --- keys ----------------------------------------------------------------------------

    async def _key(self, kid: str) -> jwt.PyJWK:
        if time.monotonic() >= self._keys_fresh_until:
            try:
                await self._refresh_keys(stale_only=True)
            except VerifierUnavailable as exc:
                # Keep using the keys fetched before; try again after the rate-limit interval.
                self._keys_fresh_until = time.monotonic() + self.jwks_min_refresh_seconds
                if not self._keys:
                    raise
                log.warning("JWKS refresh failed (%s); using the keys fetched before", exc)
        key = self._keys.get(kid)
        if key is None and time.monotonic() - self._keys_fetched_at >= \
                self.jwks_min_refresh_seconds:
            await self._refresh_keys(stale_only=False)  # a new key, after a rotation?
            key = self._keys.get(kid)
        if key is None:
            if not self._keys:
                raise VerifierUnavailable("no keys fetched from tessera yet")
            raise TokenRejected("unknown signing key")
        return key

    async def _refresh_keys(self, *, stale_only: bool) -> None:
        started = time.monotonic()
        async with self._keys_lock:
            if self._keys_fetched_at >= started or (
                    stale_only and time.monotonic() < self._keys_fresh_until):
                return  # another request fetched them meanwhile
            headers = {"If-None-Match": self._keys_etag} if self._keys_etag else {}
            self._keys_fetched_at = time.monotonic()
            try:
                response = await self._http().get(self.jwks_url, headers=headers)
            except httpx.HTTPError as exc:
                raise VerifierUnavailable(f"JWKS: {exc!r}") from None
            if response.status_code == 304:
                self._keys_fresh_until = time.monotonic() + self._cache_seconds(response)
                return
            if response.status_code != 200:
                raise VerifierUnavailable(f"JWKS answered {response.status_code}")
            keys: dict[str, jwt.PyJWK] = {}
            try:
                for jwk in response.json()["keys"]:
                    if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and jwk.get("kid"):
                        keys[jwk["kid"]] = jwt.PyJWK(jwk, algorithm="EdDSA")
            except (ValueError, KeyError, TypeError, jwt.PyJWKError) as exc:
                raise VerifierUnavailable(f"malformed JWKS: {exc!r}") from None
            self._keys = keys
            self._keys_etag = response.headers.get("etag")
            self._keys_fresh_until = time.monotonic() + self._cache_seconds(response)

    def _cache_seconds(self, response: httpx.Response) -> float:
        if self.jwks_cache_seconds is not None:
            return self.jwks_cache_seconds
        for directive in response.headers.get("cache-control", "").split(","):
            name, _, value = directive.strip().partition("=")
            if name.lower() == "max-age" and value.isdigit():
                return float(value)
        return 300.0

    # --- introspection -------------------------------------------------------------------

    async def _introspect(self, token: str, claims: Claims) -> Claims:
        assert self.introspect_url and self.service_key
        try:
            response = await self._http().post(
                self.introspect_url, data={"token": token},
                headers={"Authorization": f"Bearer {self.service_key}"})
        except httpx.HTTPError as exc:
            raise VerifierUnavailable(f"introspection: {exc!r}") from None
        if response.status_code != 200:
            if response.status_code == 401:
                log.error("tessera refused the service key (introspection)")
            raise VerifierUnavailable(f"introspection answered {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            raise VerifierUnavailable("introspection answered no JSON") from None
        if answer.get("active") is not True or answer.get("sid") != claims.sid:
            self.revoke(claims.sid, claims.exp)
            raise TokenRejected("session ended")
        accepted = answer.get("policy_accepted")
        return replace(claims, policy_accepted=accepted if isinstance(accepted, bool) else None)

    # --- the revocation feed -------------------------------------------------------------

    @property
    def feed_live(self) -> bool:
        """True while connected to the revocation feed (revocations reach this process)."""
        return self._feed_connected.is_set()

    async def follow_revocations(self, *, wait_seconds: float | None = 5.0,
                                 ) -> asyncio.Task[None]:
        """Follow tessera's revocation feed in a background task, reconnecting by itself.

        Waits up to `wait_seconds` for the first connection (never raises if it does not
        come: the task keeps trying); returns the task. Stop it with `aclose()`.
        """
        if not (self.revocations_url and self.service_key):
            raise ValueError("following revocations needs base_url and service_key")
        if self._follower is None or self._follower.done():
            self._follower = asyncio.get_running_loop().create_task(
                self._follow(), name="tessera-revocations")
        if wait_seconds:
            try:
                await asyncio.wait_for(self._feed_connected.wait(), wait_seconds)
            except TimeoutError:
                log.warning("revocation feed not connected after %.1f s; still trying",
                            wait_seconds)
        return self._follower

    async def _follow(self) -> None:
        delay = self.reconnect_min_seconds
        while True:
            connected_at: float | None = None

            def connected() -> None:
                nonlocal connected_at
                connected_at = time.monotonic()

            try:
                await self._stream(connected)
                log.info("revocation feed ended by tessera; reconnecting")
            except (httpx.HTTPError, _FeedRefused) as exc:
                log.warning("revocation feed: %r", exc)
            except Exception:  # never let the follower die silently
                log.exception("revocation feed failed")
            finally:
                self._feed_connected.clear()
            if connected_at is not None and time.monotonic() - connected_at > 10:
                delay = self.reconnect_min_seconds  # it held for a while: reconnect at once
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 (jitter)
            delay = min(delay * 2, self.reconnect_max_seconds)

    async def _stream(self, connected: Any) -> None:
        """One connection, until tessera ends it or it breaks; `connected()` once it is live."""
        assert self.revocations_url and self.service_key
        timeout = httpx.Timeout(self.timeout_seconds, read=self.feed_read_timeout_seconds)
        async with self._http().stream(
                "GET", self.revocations_url, timeout=timeout,
                headers={"Authorization": f"Bearer {self.service_key}",
                         "Accept": "text/event-stream", "Cache-Control": "no-store"},
        ) as response:
            if response.status_code != 200:
                raise _FeedRefused(f"tessera answered {response.status_code}")
            # tessera answers once its subscription is live: nothing is missed from here on.
            self.feed_connections += 1
            self._feed_connected.set()
            connected()
            data: list[str] = []
            async for line in response.aiter_lines():
                if line:
                    name, _, value = line.partition(":")
                    if name == "data":
                        data.append(value[1:] if value.startswith(" ") else value)
                    continue  # comments (heartbeats), `retry:` and other fields
                if data:
                    self._on_event("\n".join(data))
                    data = []

    def _on_event(self, data: str) -> None:
        try:
            event = json.loads(data)
            sid, exp = event["sid"], event["exp"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed revocation event")
            return
        if isinstance(sid, str) and isinstance(exp, int):
            self.revoke(sid, exp)

    # --- lifecycle -----------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_seconds)
        return self._client

    async def aclose(self) -> None:
        """Stop following the feed and close the HTTP client this verifier made."""
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            try:
                await follower
            except asyncio.CancelledError:
                pass
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """`FastAPI(lifespan=verifier.lifespan)`: while the app runs, follow the revocation
        feed (when there is a service key); close everything at shutdown."""
        if self.service_key and self.revocations_url:
            await self.follow_revocations()
        try:
            yield
        finally:
            await self.aclose()

    async def __aenter__(self) -> TesseraVerifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _FeedRefused(Exception):
    pass


def _claims(payload: dict[str, Any], kid: str) -> Claims:
    values = {name: payload.get(name) for name in REQUIRED_CLAIMS}
    if not all(isinstance(values[n], str) and values[n] for n in ("sub", "sid", "jti", "iss")):
        raise TokenRejected("malformed claims")
    if not isinstance(values["aud"], str):
        raise TokenRejected("malformed claims")
    if not all(isinstance(values[n], int) for n in ("iat", "exp")):
        raise TokenRejected("malformed claims")
    amr, auth_time = payload.get("amr", ["pwd"]), payload.get("auth_time", payload["iat"])
    if not (isinstance(amr, list) and all(isinstance(v, str) for v in amr)
            and isinstance(auth_time, int)):
        raise TokenRejected("malformed claims")
    return Claims(sub=payload["sub"], sid=payload["sid"], iss=payload["iss"],
                  aud=payload["aud"], iat=payload["iat"], exp=payload["exp"],
                  jti=payload["jti"], kid=kid, raw=payload, amr=tuple(amr),
                  auth_time=auth_time)
