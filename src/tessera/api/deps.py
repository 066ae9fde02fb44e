"""Typed dependencies: route signatures read like sentences.

A route names each collaborator it uses (`settings: SettingsDep`, `logins: LoginsDep`, ...):
one small dependency per collaborator the lifespan built (services.py), never the whole
holder.

The edge (edge/edge.py) has already checked the request's token, once, with the one token
check (domain/auth.py) and left the principal on `request.state`; these dependencies only
read it, check CSRF for cookie-authenticated changes and apply the policy gate. They are
flat (they take only the request): each level of FastAPI dependency solving costs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.api.clients import require_service_key
from tessera.config import Settings
from tessera.domain.accounts import Erasure, Logins
from tessera.domain.auth import Principal, check_csrf
from tessera.domain.mail import MailWorker
from tessera.domain.mfa import SecondFactors
from tessera.domain.policy import PolicyCache, must_consent
from tessera.domain.profiles import ProfileCache
from tessera.edge.edge import principal_in
from tessera.errors import Problem, not_authenticated
from tessera.metrics import Metrics
from tessera.security.passwords import PasswordHasher
from tessera.services import Tessera
from tessera.stores.audit import AuditTrail
from tessera.stores.keys import KeyCipher, KeyRing
from tessera.stores.models import User
from tessera.stores.ratelimit import AttemptLimiter
from tessera.stores.redis import AnyRedis
from tessera.stores.sessions import SessionStore
from tessera.stores.usage import UsageRecorder

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _held(name: str) -> Any:
    """The dependency that hands a route the one collaborator `name` of the holder."""
    if name not in Tessera.__dataclass_fields__:
        raise AttributeError(f"the lifespan builds no collaborator {name!r}")

    async def dependency(request: Request) -> Any:
        # async: FastAPI would run a plain `def` dependency in a worker thread, per request.
        return getattr(request.app.state.tessera, name)

    dependency.__name__ = dependency.__qualname__ = f"get_{name}"
    return Depends(dependency)


SettingsDep = Annotated[Settings, _held("settings")]
DbFactoryDep = Annotated[async_sessionmaker[AsyncSession], _held("db_factory")]
EngineDep = Annotated[AsyncEngine, _held("engine")]
CipherDep = Annotated[KeyCipher, _held("cipher")]
RedisDep = Annotated[AnyRedis, _held("redis")]
SessionsDep = Annotated[SessionStore, _held("sessions")]
KeysDep = Annotated[KeyRing, _held("keys")]
HasherDep = Annotated[PasswordHasher, _held("hasher")]
UsageDep = Annotated[UsageRecorder, _held("usage")]
MetricsDep = Annotated[Metrics, _held("metrics")]
PolicyDep = Annotated[PolicyCache, _held("policy")]
CsrfKeyDep = Annotated[bytes, _held("csrf_key")]
LimiterDep = Annotated[AttemptLimiter, _held("limiter")]
ProfilesDep = Annotated[ProfileCache, _held("profiles")]
AuditTrailDep = Annotated[AuditTrail, _held("audit_trail")]
MailWorkerDep = Annotated[MailWorker, _held("mail")]
LoginsDep = Annotated[Logins, _held("logins")]
ErasureDep = Annotated[Erasure, _held("erasure")]
SecondFactorsDep = Annotated[SecondFactors, _held("factors")]


async def service_caller(request: Request, settings: SettingsDep) -> None:
    """The caller holds a service key (the revocation feed; introspection checks the same in
    api/lean.py)."""
    require_service_key(request.scope, settings.service_keys, {})


ServiceCaller = Annotated[None, Depends(service_caller)]


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    db_factory: async_sessionmaker[AsyncSession] = request.app.state.tessera.db_factory
    async with db_factory() as db:
        yield db


DbDep = Annotated[AsyncSession, Depends(get_db)]


def request_cookie(request: Request, name: str) -> str:
    """One of tessera's own cookies, as the edge parsed it (exact name, first one wins)."""
    cookies: dict[bytes, bytes] = request.scope.get("state", {}).get("cookies", {})
    return cookies.get(name.encode(), b"").decode("latin-1")


def principal_of(request: Request) -> Principal | None:
    """The principal the edge found (None: no valid token); a store failure it met is raised
    here, where the route needs the answer (503)."""
    principal = principal_in(request.scope)
    state = request.scope["state"]
    if principal is not None and principal.via_cookie and request.method in UNSAFE_METHODS \
            and not state.get("csrf_checked"):
        t: Tessera = request.app.state.tessera
        check_csrf(t.csrf_key, principal.sid, request.headers.get("x-csrf-token", ""),
                   request_cookie(request, t.settings.csrf_cookie))
        state["csrf_checked"] = True
    return principal


async def require_principal(request: Request) -> Principal:
    principal = principal_of(request)
    if principal is None:
        raise not_authenticated()
    return principal


async def optional_principal(request: Request) -> Principal | None:
    return principal_of(request)


CurrentSession = Annotated[Principal, Depends(require_principal)]
OptionalSession = Annotated[Principal | None, Depends(optional_principal)]


async def _checked(request: Request, *, gated: bool) -> Principal:
    principal = await require_principal(request)
    if gated and must_consent(principal.profile.policy_seq,
                              await request.app.state.tessera.policy.get()):
        raise Problem("policy_consent_required",
                      "The policy changed substantially; accept the current version first.")
    return principal


async def _user_row(request: Request, db: AsyncSession, *, gated: bool) -> User:
    principal = await _checked(request, gated=gated)
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
        raise Problem("forbidden", "This needs the admin role.")
    return user


# Exempt from the policy gate (API.md): GET /me, GET /me/export, DELETE /me,
# POST /me/policy-consent, POST /auth/logout, POST /auth/logout-all.
CurrentUserAnyPolicy = Annotated[User, Depends(user_any_policy)]
CurrentUser = Annotated[User, Depends(user_policy_gated)]
AdminUser = Annotated[User, Depends(admin_user)]


USER_AUTH_DEPENDENCIES = frozenset({require_principal, optional_principal, user_any_policy,
                                    user_policy_gated, admin_user})
