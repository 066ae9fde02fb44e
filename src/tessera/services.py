"""What the lifespan builds once and hangs on `app.state.tessera`, and closes at shutdown.

`Tessera` only holds the collaborators; it is handed to no route or domain function. A route
names each collaborator it uses through its own small dependency (api/deps.py), and a domain
function takes each as a parameter (or a purpose-built group that always travels together:
`accounts.Logins`, `accounts.Erasure`, `mfa.SecondFactors`). The lean handlers (api/lean.py)
name theirs as keyword parameters, bound in one place (`lean.handlers`).
tests/test_layering.py keeps domain, stores, routes and lean handlers from ever seeing it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.config import Settings
from tessera.domain.accounts import Erasure, Logins
from tessera.domain.auth import TokenChecker
from tessera.domain.mail import MailWorker
from tessera.domain.mfa import SecondFactors
from tessera.domain.policy import PolicyCache
from tessera.domain.profiles import ProfileCache
from tessera.metrics import Metrics
from tessera.ops.embedded import EmbeddedRedis
from tessera.security.passwords import PasswordHasher
from tessera.stores.audit import AuditTrail
from tessera.stores.keys import KeyCipher, KeyRing
from tessera.stores.ratelimit import AttemptLimiter
from tessera.stores.redis import AnyRedis
from tessera.stores.scrub import SnapshotScrubber
from tessera.stores.sessions import SessionStore
from tessera.stores.usage import UsageRecorder


@dataclass
class Tessera:
    settings: Settings
    secret: bytes
    cipher: KeyCipher  # encrypts what is stored secret: signing keys, webhook secrets
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
    scrubber: SnapshotScrubber  # rewrites Redis's files after an erasure (stores/scrub.py)
    logins: Logins
    erasure: Erasure
    factors: SecondFactors
    embedded_redis: EmbeddedRedis | None = field(default=None)
