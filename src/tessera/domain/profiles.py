"""The user's profile, cached in Redis beside their sessions: a typed value.

`tessera:{<uid>}:profile` shares the user's hash tag, so a request's token check reads the
session and the profile in one MGET: GET /me, the policy gate, the tracking decision and
introspection need no database read. The account write path (`domain/accounts.py`
`user_changed`) owns it: every change to a user goes through there, which drops the cached
value; routes never invalidate. A short TTL bounds staleness from changes made outside any
tessera process.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.domain import consents
from tessera.stores.durability import WriteGate, is_write_refusal
from tessera.stores.memo import Memo
from tessera.stores.models import User
from tessera.stores.redis import AnyRedis
from tessera.timeutil import rfc3339

PROFILE_TTL_SECONDS = 300


def profile_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:profile"


def generation_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:profile-gen"


# Caches a profile only if no change to the user was committed since it was read: a change
# bumps the generation (`invalidate`), so a profile read before it is not stored after it.
_STORE_IF_CURRENT = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""
GENERATION_TTL_SECONDS = 86400


def account_view(user: User, current_consents: dict[str, Any]) -> dict[str, Any]:
    """What GET /me answers."""
    return {
        "id": user.id,
        "email": user.email,
        "email_verified": user.email_verified,
        "pending_email": user.pending_email,
        "created_at": rfc3339(user.created_at),
        "is_active": user.is_active,
        "is_admin": user.is_admin,
        "policy_version": user.policy_version,
        "consents": current_consents,
        "restrictions": {"restrict_processing": user.restrict_processing,
                         "object_to_processing": user.object_to_processing},
    }


@dataclass(frozen=True)
class Profile:
    """What a request needs to know of its user, without a database read."""

    policy_seq: int
    is_active: bool
    is_admin: bool
    tracking_allowed: bool
    me: dict[str, Any]  # the GET /me document

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @cached_property
    def me_body(self) -> bytes:
        """The GET /me body, rendered once per decoded profile (the memo keeps it)."""
        return json.dumps(self.me).encode()

    @classmethod
    def decode(cls, raw: str | None) -> Profile | None:
        if raw is None:
            return None
        known = _decoded.get(raw)
        if known is not None:
            return known
        try:
            value = json.loads(raw)
            profile = cls(policy_seq=int(value["policy_seq"]),
                          is_active=bool(value["is_active"]), is_admin=bool(value["is_admin"]),
                          tracking_allowed=bool(value["tracking_allowed"]),
                          me=dict(value["me"]))
        except (ValueError, TypeError, KeyError, RecursionError):
            return None  # an older or damaged entry: rebuilt from the database
        _decoded.put(raw, profile)
        return profile


# The cached profile as Redis holds it -> decoded (stores/memo.py): the token check reads the
# same entry on every request until the user changes, which writes a new one.
_decoded: Memo[str, Profile] = Memo()


async def build_profile(db: AsyncSession, user: User) -> Profile:
    return Profile(
        policy_seq=user.policy_seq,
        is_active=user.is_active,
        is_admin=user.is_admin,
        tracking_allowed=not (user.restrict_processing or user.object_to_processing),
        me=account_view(user, await consents.current_consents(db, user.id)),
    )


class ProfileCache:
    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        self._store_if_current = redis.register_script(_STORE_IF_CURRENT)
        self.writes: WriteGate | None = None  # the session store's (main.py)

    async def generation(self, user_id: str) -> str:
        """Read before the user's row: `store` then caches only what is still current."""
        value = await self.redis.get(generation_key(user_id))
        return str(value) if value is not None else ""

    async def store(self, user_id: str, profile: Profile, generation: str) -> bool:
        stored = await self._store_if_current(
            keys=[generation_key(user_id), profile_key(user_id)],
            args=[generation, profile.encode(), PROFILE_TTL_SECONDS])
        return bool(stored)

    async def forget(self, user_id: str) -> None:
        """The account is gone (its sessions first): no key of theirs stays (P9)."""
        await self.redis.delete(generation_key(user_id), profile_key(user_id))

    async def invalidate(self, user_id: str) -> None:
        async def drop() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(generation_key(user_id))
                pipe.expire(generation_key(user_id), GENERATION_TTL_SECONDS)
                pipe.delete(profile_key(user_id))
                await pipe.execute()

        try:
            await drop()
        except Exception as exc:
            # Redis refuses writes: a stale profile (an active flag) must not come back.
            if self.writes is not None and is_write_refusal(exc):
                self.writes.refused(exc, drop)
            raise
