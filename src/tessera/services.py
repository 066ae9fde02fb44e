"""What the lifespan builds once and hangs on `app.state.tessera`: small collaborators, each
built once (`build_services`) and handed to the code that needs it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.config import Settings
from tessera.domain.auth import TokenChecker
from tessera.domain.mail import MailWorker
from tessera.domain.policy import PolicyCache
from tessera.domain.profiles import ProfileCache
from tessera.metrics import Metrics
from tessera.ops.embedded import EmbeddedRedis
from tessera.security.passwords import PasswordHasher
from tessera.stores.audit import AuditTrail
from tessera.stores.keys import KeyRing
from tessera.stores.ratelimit import AttemptLimiter
from tessera.stores.redis import AnyRedis
from tessera.stores.scrub import SnapshotScrubber
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
    auth: TokenChecker
    audit_trail: AuditTrail
    mail: MailWorker
    embedded_redis: EmbeddedRedis | None = field(default=None)
    _scrubber: SnapshotScrubber | None = field(default=None, repr=False)

    @property
    def scrubber(self) -> SnapshotScrubber:
        """Rewrites Redis's files after an erasure (stores/scrub.py)."""
        if self._scrubber is None:
            self._scrubber = SnapshotScrubber(self.redis)
        return self._scrubber
