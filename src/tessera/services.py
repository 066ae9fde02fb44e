"""What the lifespan builds once and hangs on `app.state.tessera`."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.config import Settings
from tessera.domain.mail import MailWorker
from tessera.domain.policy import PolicyCache
from tessera.domain.profiles import ProfileCache
from tessera.metrics import Metrics
from tessera.ops.embedded import EmbeddedRedis
from tessera.security.passwords import PasswordHasher
from tessera.stores.keys import KeyRing
from tessera.stores.ratelimit import AttemptLimiter
from tessera.stores.redis import AnyRedis
from tessera.stores.sessions import SessionStore
from tessera.stores.usage import UsageRecorder


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
    mail: MailWorker
    embedded_redis: EmbeddedRedis | None = field(default=None)
