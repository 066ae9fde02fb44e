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
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.domain import consents
from tessera.stores.models import User
from tessera.stores.redis import AnyRedis
from tessera.timeutil import rfc3339

PROFILE_TTL_SECONDS = 300


def profile_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:profile"


def account_view(user: User, current_consents: dict[str, Any]) -> dict[str, Any]:
    """What GET /me answers."""
    return {
        "id": user.id,
        "email": user.email,
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

    @classmethod
    def decode(cls, raw: str | None) -> Profile | None:
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            return cls(policy_seq=int(value["policy_seq"]), is_active=bool(value["is_active"]),
                       is_admin=bool(value["is_admin"]),
                       tracking_allowed=bool(value["tracking_allowed"]), me=dict(value["me"]))
        except (ValueError, TypeError, KeyError, RecursionError):
            return None  # an older or damaged entry: rebuilt from the database


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

    async def store(self, user_id: str, profile: Profile) -> None:
        await self.redis.set(profile_key(user_id), profile.encode(), ex=PROFILE_TTL_SECONDS)

    async def invalidate(self, user_id: str) -> None:
        await self.redis.delete(profile_key(user_id))
