"""The one token check, used by the edge (for every request that carries a token), the
routes, introspection and forward auth: a token is valid while its session exists.

A well-formed token whose session exists in Redis and holds this token's keyed hash; with
the user's cached profile (loaded from the database and cached on a miss). One Redis read,
batched with concurrent ones: the session and the profile share a hash slot.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.domain.profiles import Profile, ProfileCache, build_profile, profile_key
from tessera.errors import Problem
from tessera.security.tokens import UnverifiedClaims, peek_claims, token_hash
from tessera.stores.memo import Memo
from tessera.stores.models import User
from tessera.stores.sessions import SessionRecord, SessionStore

MAX_TOKEN_LENGTH = 4096


def csrf_token_for(csrf_key: bytes, sid: str) -> str:
    """Signed double-submit: the csrf cookie's value is an HMAC of the session id."""
    mac = hmac.new(csrf_key, sid.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def check_csrf(csrf_key: bytes, sid: str, header: str, cookie: str) -> None:
    expected = csrf_token_for(csrf_key, sid)
    if not (header and hmac.compare_digest(header.encode(), cookie.encode())
            and hmac.compare_digest(header.encode(), expected.encode())):
        raise Problem("csrf_failed", "The X-CSRF-Token header must match the csrf cookie.")


@dataclass
class Principal:
    """Who a request is authenticated as: the session, how its token travelled, the token's
    (signature-checked by the stored hash) claims and the user's profile."""

    user_id: str
    session: SessionRecord
    token: str
    via_cookie: bool
    profile: Profile
    claims: dict[str, Any]

    @property
    def sid(self) -> str:
        return self.session.sid


class TokenChecker:
    """Small collaborator: sessions + profiles + the key of the stored token hash."""

    def __init__(self, sessions: SessionStore, profiles: ProfileCache, token_key: bytes,
                 db_factory: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.profiles = profiles
        self.token_key = token_key
        self.db_factory = db_factory
        # token -> its claims and keyed hash, both pure functions of the token (memo.py)
        self._tokens: Memo[str, tuple[UnverifiedClaims, str]] = Memo()

    async def check(self, token: str, *, via_cookie: bool = False) -> Principal | None:
        """The principal of an active user's live session, or None."""
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        known = self._tokens.get(token)
        if known is None:
            claims = peek_claims(token)
            if claims is None:
                return None
            digest = token_hash(self.token_key, token)
        else:
            claims, digest = known
        record, raw_profile = await self.sessions.check_with(
            claims.sub, claims.sid, digest, profile_key(claims.sub))
        if record is None:
            return None
        if known is None:  # only tokens that passed: random ones cannot churn the memo
            self._tokens.put(token, (claims, digest))
        profile = Profile.decode(raw_profile)
        if profile is None:
            profile = await self._load_profile(record)
        if profile is None or not profile.is_active:
            return None
        return Principal(record.user_id, record, token, via_cookie, profile, claims.raw)

    async def _load_profile(self, record: SessionRecord) -> Profile | None:
        generation = await self.profiles.generation(record.user_id)
        async with self.db_factory() as db:
            user = await db.get(User, record.user_id)
            if user is None:
                return None
            profile = await build_profile(db, user)
        # Not cached if the user changed meanwhile (a restriction, say): the next request
        # reads again, rather than a stale profile standing for 5 minutes.
        await self.profiles.store(record.user_id, profile, generation)
        # A session deleted meanwhile (logout, account deletion) must not leave a profile.
        if await self.sessions.get(record.user_id, record.sid) is None:
            await self.profiles.invalidate(record.user_id)
            return None
        return profile
