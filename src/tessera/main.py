"""create_app(): settings -> lifespan (stores, collaborators) -> routes -> the one edge.

A request meets: the edge (edge/edge.py: ids, limits, privacy, usage, metrics, the token
check) -> CORS (when configured) -> the lean endpoints (api/lean.py) or FastAPI's router.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from tessera import __version__
from tessera.api import (
    admin,
    auth,
    health,
    me,
    mfa,
    pages,
    revocations,
    webhooks,
    wellknown,
)
from tessera.api.docs import install_docs
from tessera.api.lean import LeanRoutes
from tessera.api.openapi import api_routes, install_openapi
from tessera.config import Settings
from tessera.domain.accounts import Erasure, Logins
from tessera.domain.auth import TokenChecker
from tessera.domain.events import EventWorker
from tessera.domain.mail import MailWorker
from tessera.domain.mfa import SecondFactors
from tessera.domain.policy import PolicyCache
from tessera.domain.profiles import ProfileCache
from tessera.edge.edge import Edge
from tessera.edge.proxy import TrustedProxyMiddleware
from tessera.errors import install_error_handlers, install_unavailable_handlers
from tessera.metrics import Metrics
from tessera.ops.embedded import EmbeddedRedis
from tessera.ops.lifeline import worker_dies_with_supervisor
from tessera.security.passwords import PasswordHasher
from tessera.security.secret import load_or_create_secret
from tessera.services import Tessera
from tessera.stores.audit import AuditTrail
from tessera.stores.db import create_engine, session_factory
from tessera.stores.durability import require_durable_redis
from tessera.stores.keys import KeyCipher, KeyRing, derive_key
from tessera.stores.mfa import SecretBox
from tessera.stores.ratelimit import AttemptLimiter
from tessera.stores.redis import create_redis
from tessera.stores.reserve import DiskReserve, is_disk_full, reserve_for
from tessera.stores.scrub import SnapshotScrubber
from tessera.stores.sessions import SessionStore
from tessera.stores.usage import UsageRecorder

DESCRIPTION = """tessera issues and checks login sessions and enforces a privacy policy in code.
Use **Authorize** with your email as the username to try authenticated endpoints.
The guide to this API is docs/api.md in the repository."""


log = logging.getLogger("tessera")


async def _last_flushes(usage: UsageRecorder, audit_trail: AuditTrail,
                        reserve: DiskReserve | None) -> None:
    """The shutdown's flushes of the events waiting in memory. On a full disk the disk
    reserve is freed and they are tried again (stores/reserve.py). What still fails is
    logged, not raised: the rest of the shutdown (the mail worker, the embedded
    redis-server) runs all the same."""
    try:
        await usage.stop()
    except Exception as exc:
        if reserve is not None and is_disk_full(exc) and reserve.release():
            try:
                await usage.flush()
            except Exception as again:
                exc = again
        if usage.pending:
            log.error("the shutdown flush lost %d usage events: %s", usage.pending,
                      type(exc).__name__)
    await audit_trail.stop()  # keeps what it cannot write
    if audit_trail.pending and reserve is not None and reserve.release():
        try:
            await audit_trail.flush()
        except Exception as exc:
            log.error("the shutdown flush lost audit events: %s", type(exc).__name__)
    if audit_trail.pending:
        log.error("the shutdown flush lost %d audit events", audit_trail.pending)


class TesseraApp(FastAPI):
    """FastAPI, entered through the edge (`entry`, set by create_app)."""

    entry: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        if self.entry is None:  # pragma: no cover - create_app always sets it
            await super().__call__(scope, receive, send)
            return
        await self.entry(scope, receive, send)

    async def stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's own stack (error handling, router), inside the edge."""
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> TesseraApp:
    worker_dies_with_supervisor()  # a worker of `tessera serve --workers N`: see ops/lifeline.py
    settings = settings or Settings()
    engine = create_engine(settings.resolved_database_url,
                           connect_timeout=settings.db_connect_timeout_seconds,
                           statement_timeout=settings.db_statement_timeout_seconds)
    db_factory = session_factory(engine)
    metrics = Metrics()
    usage = UsageRecorder(db_factory, flush_events=settings.usage_flush_events,
                          flush_seconds=settings.usage_flush_seconds)
    audit_trail = AuditTrail(db_factory, flush_seconds=settings.usage_flush_seconds)
    mail = MailWorker(db_factory, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: TesseraApp) -> AsyncIterator[None]:
        secret = load_or_create_secret(settings)
        embedded = None
        reserve = reserve_for(settings.resolved_database_url)
        redis_url = settings.redis_url
        if not redis_url:
            embedded = EmbeddedRedis(settings.data_dir)
            redis_url = embedded.start(supervise=True)
        redis = create_redis(redis_url)
        if reserve is not None:
            reserve.ensure()  # room for the shutdown flush on a full disk
        if settings.redis_durability == "require":
            await require_durable_redis(redis)
        cipher = KeyCipher(secret)
        keys = KeyRing(db_factory, cipher, ttl_seconds=settings.session_ttl_seconds,
                       cache_seconds=settings.keys_cache_seconds)
        sessions = SessionStore(redis, db_factory)
        profiles = ProfileCache(redis)
        profiles.attach(sessions.writes)
        try:
            await keys.ensure_key()
            # Deletions Redis refused (on any instance) are done before the first request.
            await sessions.writes.start()
            token_key = derive_key(secret, b"token-hash")
            checker = TokenChecker(sessions, profiles, token_key, db_factory)
            logins = Logins(settings, keys, sessions, token_key, metrics)
            scrubber = SnapshotScrubber(redis)
            limiter = AttemptLimiter(redis, derive_key(secret, b"rate-limit"))
            app.state.tessera = Tessera(
                settings=settings, secret=secret, cipher=cipher, engine=engine,
                db_factory=db_factory,
                redis=redis, sessions=sessions, keys=keys,
                hasher=PasswordHasher(
                    settings.bcrypt_rounds,
                    per_account=settings.password_work_concurrency_per_account),
                usage=usage, metrics=metrics,
                policy=PolicyCache(db_factory), csrf_key=derive_key(secret, b"csrf"),
                token_key=token_key,
                limiter=limiter,
                profiles=profiles, auth=checker, audit_trail=audit_trail, mail=mail,
                scrubber=scrubber, logins=logins,
                erasure=Erasure(settings, logins, profiles, usage, audit_trail, mail, engine,
                                scrubber),
                factors=SecondFactors(settings, redis, limiter, SecretBox(secret), profiles),
                embedded_redis=embedded)
            edge.checker = checker
            usage.start()
            audit_trail.start()
            mail.start()
            app.state.events = EventWorker(db_factory, settings, cipher)
            app.state.events.start()
            # What start-up built (modules, the app, settings, pools) lives as long as the
            # process: frozen out of the cyclic GC, a full collection no longer walks it.
            # Measured under a GET /me flood: each full collection stopped the loop for
            # ~130 ms before (p99 ~110 ms), ~3 ms after (p99 ~12 ms).
            gc.collect()
            gc.freeze()
            yield
        finally:
            gc.unfreeze()  # an app torn down in a process that goes on (tests) is collectable
            edge.checker = None
            started = getattr(app.state, "tessera", None)
            if started is not None:
                started.hasher.close()
            await sessions.writes.stop()
            await revocations.close_revocation_hub(app)  # end open feeds and the subscription
            if getattr(app.state, "events", None) is not None:
                await app.state.events.stop()
            await _last_flushes(usage, audit_trail, reserve)
            await mail.stop()
            await redis.aclose()
            await engine.dispose()
            if embedded is not None:
                embedded.stop()

    # No slash redirects: they would be built from the client's Host header.
    app = TesseraApp(title="tessera", version=__version__, description=DESCRIPTION,
                     lifespan=lifespan, redirect_slashes=False, docs_url=None, redoc_url=None)
    install_openapi(app)
    install_docs(app)  # /docs and /redoc with assets served by tessera (offline)
    install_error_handlers(app)
    install_unavailable_handlers(app)
    for module in (health, wellknown, auth, revocations, me, mfa, admin, webhooks, pages):
        app.include_router(module.router)

    inner: ASGIApp = LeanRoutes(app.stack, lambda: app.state.tessera,
                                {route.path for route in api_routes(app.routes)})
    if settings.cors_origins:
        inner = CORSMiddleware(
            inner, allow_origins=settings.cors_origins, allow_credentials=True,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-CSRF-Token", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Tk", "Retry-After"], max_age=600)
    edge: Edge = Edge(inner, settings=settings, metrics=metrics, usage=usage)
    entry: ASGIApp = edge
    if settings.proxy_headers:  # outermost: every layer sees the real client address
        entry = TrustedProxyMiddleware(entry, allowed=settings.forwarded_allow_ips)
    app.entry = entry
    return app
