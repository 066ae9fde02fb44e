"""What the lifespan builds once and hangs on `app.state.tessera`."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from app.embedded import EmbeddedRedis
from app.metrics import Metrics
from app.policy import PolicyCache
from app.profiles import ProfileCache
from app.ratelimit import AttemptLimiter
from app.redis import AnyRedis
from app.security.keys import KeyRing
from app.security.passwords import PasswordHasher
from app.sessions import SessionStore
from app.settings import Settings
from app.usage import UsageRecorder


@dataclass
class Tessera:
    settings: Settings
    secret: bytes
    engine: AsyncEngine
    db_factory: async_sessionmaker[AsyncSession]
    redis: AnyRedis
    sessions: SessionStore
    keys: KeyRing
    hasher: PasswordHasher
    usage: UsageRecorder
    metrics: Metrics
    policy: PolicyCache
    csrf_key: bytes
    token_key: bytes
    limiter: AttemptLimiter
    profiles: ProfileCache
    embedded_redis: EmbeddedRedis | None = field(default=None)
