"""create_app(): settings -> lifespan (db, redis, keys) -> middleware -> routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.middleware.cors import CORSMiddleware

from tessera import __version__
from tessera.api import admin, auth, health, me, pages, revocations, wellknown
from tessera.api.openapi import install_openapi
from tessera.config import Settings
from tessera.domain.mail import MailWorker
from tessera.domain.policy import PolicyCache
from tessera.domain.profiles import ProfileCache
from tessera.edge.fastpath import FastPath, TesseraApp
from tessera.edge.middleware import (
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
    RequestIdMiddleware,
    SecurityHeadersMiddleware,
)
from tessera.edge.privacy import PrivacyMiddleware
from tessera.errors import install_error_handlers, install_unavailable_handlers
from tessera.metrics import Metrics, MetricsMiddleware
from tessera.ops.embedded import EmbeddedRedis
from tessera.security.passwords import PasswordHasher
from tessera.security.secret import load_or_create_secret
from tessera.services import Tessera
from tessera.stores.db import create_engine, session_factory
from tessera.stores.keys import KeyCipher, KeyRing, derive_key
from tessera.stores.ratelimit import AttemptLimiter
from tessera.stores.redis import create_redis
from tessera.stores.sessions import SessionStore
from tessera.stores.usage import UsageRecorder

DESCRIPTION = """tessera issues and checks login sessions and enforces a privacy policy in code.
Use **Authorize** with your email as the username to try authenticated endpoints."""


def create_app(settings: Settings | None = None) -> TesseraApp:
    settings = settings or Settings()
    engine = create_engine(settings.resolved_database_url)
    db_factory = session_factory(engine)
    metrics = Metrics()
    usage = UsageRecorder(db_factory, flush_events=settings.usage_flush_events,
                          flush_seconds=settings.usage_flush_seconds)
    mail = MailWorker(db_factory, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: TesseraApp) -> AsyncIterator[None]:
        secret = load_or_create_secret(settings)
        embedded = None
        redis_url = settings.redis_url
        if not redis_url:
            embedded = EmbeddedRedis(settings.data_dir)
            redis_url = embedded.start()
        redis = create_redis(redis_url)
        keys = KeyRing(db_factory, KeyCipher(secret), ttl_seconds=settings.session_ttl_seconds,
                       cache_seconds=settings.keys_cache_seconds)
        try:
            await keys.ensure_key()
            app.state.tessera = Tessera(
                settings=settings, secret=secret, engine=engine, db_factory=db_factory,
                redis=redis, sessions=SessionStore(redis), keys=keys,
                hasher=PasswordHasher(settings.bcrypt_rounds), usage=usage, metrics=metrics,
                policy=PolicyCache(db_factory), csrf_key=derive_key(secret, b"csrf"),
                token_key=derive_key(secret, b"token-hash"),
                limiter=AttemptLimiter(redis, derive_key(secret, b"rate-limit")),
                profiles=ProfileCache(redis), mail=mail, embedded_redis=embedded)
            # With OpenTelemetry configured when tessera starts, FastAPI traces every request:
            # the fast path steps aside so these two keep their spans and metrics.
            telemetry = getattr(app, "_native_telemetry", None)
            if settings.fast_path and not (telemetry is not None and telemetry.enabled()):
                app.fast_path = FastPath(app.state.tessera)
            usage.start()
            mail.start()
            yield
        finally:
            app.fast_path = None
            started = getattr(app.state, "tessera", None)
            if started is not None:
                started.hasher.close()
            await revocations.close_revocation_hub(app)  # end open feeds and the subscription
            await usage.stop()
            await mail.stop()
            await redis.aclose()
            await engine.dispose()
            if embedded is not None:
                embedded.stop()

    # No slash redirects: they would be built from the client's Host header.
    app = TesseraApp(title="tessera", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, redirect_slashes=False)
    install_openapi(app)
    install_error_handlers(app)
    install_unavailable_handlers(app)
    for module in (health, wellknown, auth, revocations, me, admin, pages):
        app.include_router(module.router)

    # Added innermost first: a request meets them in the reverse order.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Inside the privacy middleware (whose cookie check splits names only, no unquoting), so
    # a 431 carries Tk and Vary like every answer.
    app.add_middleware(HeaderLimitMiddleware)
    app.add_middleware(PrivacyMiddleware, settings=settings, usage=usage)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=True,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-CSRF-Token", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Tk", "Retry-After"], max_age=600)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(SecurityHeadersMiddleware, hsts=settings.cookie_secure)
    app.add_middleware(RequestIdMiddleware)
    return app
