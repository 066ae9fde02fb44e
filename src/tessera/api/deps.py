"""Typed dependencies: route signatures read like sentences."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.api.cookies import read_cookie
from tessera.domain.policy import must_consent
from tessera.domain.profiles import ProfileCache, build_profile, profile_key
from tessera.edge.privacy import attribute_usage, forbid_tracking
from tessera.errors import Problem, not_authenticated
from tessera.security.tokens import UnverifiedClaims, peek_claims, token_hash
from tessera.services import Tessera
from tessera.stores.models import User
from tessera.stores.sessions import SessionRecord

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})



async def get_tessera(request: Request) -> Tessera:
    # async: FastAPI would run a plain `def` dependency in a worker thread, per request.
    tessera: Tessera = request.app.state.tessera
    return tessera


TesseraDep = Annotated[Tessera, Depends(get_tessera)]


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    async with (await get_tessera(request)).db_factory() as db:
        yield db


DbDep = Annotated[AsyncSession, Depends(get_db)]


def csrf_token_for(csrf_key: bytes, sid: str) -> str:
    """Signed double-submit: the csrf cookie's value is an HMAC of the session id."""
    mac = hmac.new(csrf_key, sid.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


@dataclass
class Principal:
    """Who a request is authenticated as: the session, how its token travelled, and the
    user's cached profile (None until loaded)."""

    user_id: str
    session: SessionRecord
    token: str
    via_cookie: bool
    profile: dict[str, Any] | None = None
    claims: dict[str, Any] | None = None

    @property
    def sid(self) -> str:
        return self.session.sid


def _presented_token(request: Request, t: Tessera) -> tuple[str | None, bool]:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip(), False
        return None, False
    cookie = read_cookie(request.headers, t.settings.session_cookie)
    return (cookie, True) if cookie else (None, False)


def check_csrf(request: Request, t: Tessera, sid: str) -> None:
    header = request.headers.get("x-csrf-token", "")
    cookie = read_cookie(request.headers, t.settings.csrf_cookie) or ""
    expected = csrf_token_for(t.csrf_key, sid)
    if not (header and hmac.compare_digest(header.encode(), cookie.encode())
            and hmac.compare_digest(header.encode(), expected.encode())):
        raise Problem(403, "csrf_failed", "The X-CSRF-Token header must match the csrf cookie.")


_FAILURE = "tessera.failure"


def hand_over_failure(scope: MutableMapping[str, Any], exc: Exception) -> None:
    """The fast path met a failing store: the full stack raises this again where it would
    have met it (`raise_handed_over`), and answers as ever (503), without a second try."""
    scope[_FAILURE] = exc


def raise_handed_over(request: Request) -> None:
    exc = request.scope.pop(_FAILURE, None)
    if exc is not None:
        raise exc


async def check_token(t: Tessera, token: str) -> tuple[
        UnverifiedClaims, SessionRecord, dict[str, Any] | None] | None:
    """The one token check (routes, introspection, app/fastpath.py): a well-formed token
    whose session exists and holds this token's keyed hash; with the user's cached profile
    (None if not cached). One Redis read, batched with concurrent ones: the session and the
    profile share a hash slot."""
    claims = peek_claims(token)
    if claims is None:
        return None
    record, raw_profile = await t.sessions.check_with(
        claims.sub, claims.sid, token_hash(t.token_key, token), profile_key(claims.sub))
    if record is None:
        return None
    return claims, record, ProfileCache.decode(raw_profile)


async def lookup_token(t: Tessera, token: str) -> Principal | None:
    """`check_token`, with the profile loaded on a miss; None unless the user is active."""
    found = await check_token(t, token)
    if found is None:
        return None
    claims, record, cached = found
    principal = Principal(record.user_id, record, token, False, cached, claims.raw)
    profile = await principal_profile(t, principal)
    if profile is None or not profile["is_active"]:
        return None
    return principal


async def resolve_principal(request: Request, t: Tessera) -> Principal | None:
    """The session this request is authenticated by, or None. Checks CSRF for cookies and
    applies the user's tracking choice to the whole request."""
    token, via_cookie = _presented_token(request, t)
    if token is None:
        return None
    raise_handed_over(request)
    principal = await lookup_token(t, token)
    if principal is None:
        return None
    principal.via_cookie = via_cookie
    if via_cookie and request.method in UNSAFE_METHODS:
        check_csrf(request, t, principal.sid)
    assert principal.profile is not None
    if not principal.profile["tracking_allowed"]:
        forbid_tracking(request.scope)
    attribute_usage(request.scope, principal.user_id)
    return principal


async def principal_profile(t: Tessera, principal: Principal) -> dict[str, Any] | None:
    """The cached profile, or built from the database (and cached) on a miss."""
    if principal.profile is None:
        async with t.db_factory() as db:
            user = await db.get(User, principal.user_id)
            if user is None:
                return None
            principal.profile = await build_profile(db, user)
        await t.profiles.store(principal.user_id, principal.profile)
        # A session deleted meanwhile (logout, account deletion) must not leave a profile.
        if await t.sessions.get(principal.user_id, principal.sid) is None:
            await t.profiles.invalidate(principal.user_id)
            return None
    return principal.profile


# Dependencies on the hot paths are flat (they take only the request): each level of
# FastAPI dependency solving cost about a third of GET /me's CPU under load. The principal
# is resolved once per request and kept on request.state for the other dependencies.

async def _principal(request: Request) -> Principal | None:
    state = request.state
    if not hasattr(state, "principal"):
        state.principal = await resolve_principal(request, request.app.state.tessera)
    principal: Principal | None = state.principal
    return principal


async def require_principal(request: Request) -> Principal:
    principal = await _principal(request)
    if principal is None:
        raise not_authenticated()
    return principal


async def optional_principal(request: Request) -> Principal | None:
    return await _principal(request)


CurrentSession = Annotated[Principal, Depends(require_principal)]
OptionalSession = Annotated[Principal | None, Depends(optional_principal)]


async def _checked_profile(request: Request, *, gated: bool) -> dict[str, Any]:
    principal = await require_principal(request)
    profile = principal.profile
    assert profile is not None  # set by lookup_token
    if gated and must_consent(profile["policy_seq"],
                              await request.app.state.tessera.policy.get()):
        raise Problem(403, "policy_consent_required",
                      "The policy changed substantially; accept the current version first.")
    return profile


async def profile_any_policy(request: Request) -> dict[str, Any]:
    return await _checked_profile(request, gated=False)


async def profile_gated(request: Request) -> dict[str, Any]:
    return await _checked_profile(request, gated=True)


ProfileAnyPolicy = Annotated[dict[str, Any], Depends(profile_any_policy)]
ProfileGated = Annotated[dict[str, Any], Depends(profile_gated)]


async def _user_row(request: Request, db: AsyncSession, *, gated: bool) -> User:
    await _checked_profile(request, gated=gated)
    principal = await require_principal(request)
    user = await db.get(User, principal.user_id)
    if user is None or not user.is_active:
        raise not_authenticated()
    return user


async def user_any_policy(request: Request, db: DbDep) -> User:
    return await _user_row(request, db, gated=False)


async def user_policy_gated(request: Request, db: DbDep) -> User:
    return await _user_row(request, db, gated=True)


async def admin_user(request: Request, db: DbDep) -> User:
    user = await _user_row(request, db, gated=True)
    if not user.is_admin:
        raise Problem(403, "forbidden", "This needs the admin role.")
    return user


# Exempt from the policy gate (API.md): GET /me, GET /me/export, DELETE /me,
# POST /me/policy-consent, POST /auth/logout, POST /auth/logout-all.
CurrentUserAnyPolicy = Annotated[User, Depends(user_any_policy)]
CurrentUser = Annotated[User, Depends(user_policy_gated)]
AdminUser = Annotated[User, Depends(admin_user)]


USER_AUTH_DEPENDENCIES = frozenset({require_principal, optional_principal, profile_any_policy,
                                    profile_gated, user_any_policy, user_policy_gated,
                                    admin_user})
