"""Policy versions (P10): the current version, and which one a user must have accepted."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.errors import Problem
from tessera.stores.models import PolicyVersion, User, utcnow

# The `policy_seq` of an account that has accepted no policy version yet (registered without
# `policy_version`): below every required seq, so the gate asks for consent (P10: consent is
# never inferred).
NEVER_ACCEPTED = -1


@dataclass(frozen=True)
class PolicyState:
    current: PolicyVersion
    required_seq: int  # a user whose policy_seq is below this must consent again


async def load_policy_state(db: AsyncSession) -> PolicyState:
    current = (await db.exec(select(PolicyVersion).order_by(col(PolicyVersion.seq).desc()))).first()
    if current is None:  # the initial migration seeds one; be safe on an emptied table
        current = PolicyVersion(seq=0, version="1", substantial=False, published_at=utcnow())
    required = (await db.exec(select(func.max(PolicyVersion.seq)).where(
        col(PolicyVersion.substantial).is_(True)))).one()
    return PolicyState(current, int(required or 0))


class PolicyCache:
    """Policy state cached for a moment: it is read by every gated request. One load at a
    time: requests that find the cache stale share the load in flight (a burst of requests
    at expiry costs one query, not one each)."""

    def __init__(self, factory: async_sessionmaker[AsyncSession], ttl: float = 2.0) -> None:
        self._factory = factory
        self._ttl = ttl
        self._state: PolicyState | None = None
        self._at = 0.0
        self._generation = 0  # moved by invalidate: a load begun before it stores nothing
        self._loading: asyncio.Task[PolicyState] | None = None

    async def get(self) -> PolicyState:
        state = self._state
        if state is not None and time.monotonic() - self._at <= self._ttl:
            return state
        task = self._loading
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(self._generation))
            self._loading = task
        # shield: a request that goes away does not cancel the others' load
        return await asyncio.shield(task)

    async def _load(self, generation: int) -> PolicyState:
        try:
            async with self._factory() as db:
                state = await load_policy_state(db)
            if generation == self._generation:
                self._state, self._at = state, time.monotonic()
            return state
        finally:
            if self._loading is asyncio.current_task():
                self._loading = None

    def invalidate(self) -> None:
        self._state = None
        self._generation += 1
        self._loading = None  # the next get loads afresh rather than joining an older load


def must_consent(policy_seq: int, state: PolicyState) -> bool:
    """A user who accepted the policy at `policy_seq` must accept again (P10)."""
    return policy_seq < state.required_seq


async def publish_policy(db: AsyncSession, version: str, substantial: bool) -> PolicyVersion:
    if (await db.exec(select(PolicyVersion).where(PolicyVersion.version == version))).first():
        raise Problem("version_exists", "That policy version was published before.")
    row = PolicyVersion(version=version, substantial=substantial, published_at=utcnow())
    db.add(row)
    try:
        await db.commit()
    except IntegrityError:
        await db.rollback()
        raise Problem("version_exists", "That policy version was published before.") from None
    await db.refresh(row)
    return row


async def accept_policy(db: AsyncSession, user: User, version: str, state: PolicyState) -> None:
    if version != state.current.version:
        raise Problem("policy_outdated", "That is not the current policy version.",
                      extra={"current_version": state.current.version})
    user.policy_version = state.current.version
    user.policy_seq = state.current.seq or 0
    user.policy_accepted_at = utcnow()
    db.add(user)
    await db.commit()
