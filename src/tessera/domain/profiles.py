"""The user's profile, cached in Redis beside their sessions.

`tessera:{<uid>}:profile` shares the user's hash tag, so a request's token check reads the
session and the profile in one MGET: GET /me, the policy gate, the tracking decision and
introspection need no database read. Every change to what the profile holds deletes it
(`invalidate`); a short TTL bounds staleness from changes made outside the app.
"""

from __future__ import annotations

import json
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


async def build_profile(db: AsyncSession, user: User) -> dict[str, Any]:
    return {
        "policy_seq": user.policy_seq,
        "is_active": user.is_active,
        "is_admin": user.is_admin,
        "tracking_allowed": not (user.restrict_processing or user.object_to_processing),
        "me": account_view(user, await consents.current_consents(db, user.id)),
    }


class ProfileCache:
    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis

    @staticmethod
    def decode(raw: str | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    async def store(self, user_id: str, profile: dict[str, Any]) -> None:
        await self.redis.set(profile_key(user_id), json.dumps(profile), ex=PROFILE_TTL_SECONDS)

    async def invalidate(self, user_id: str) -> None:
        await self.redis.delete(profile_key(user_id))
