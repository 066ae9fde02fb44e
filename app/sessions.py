"""SessionStore: login sessions in Redis.

Layout (all of one user's keys share the `{user-id}` hash tag, so they live in one
Redis Cluster slot and multi-key updates can be atomic):

    tessera:{<uid>}:s:<sid>     JSON session record, TTL = the token's remaining life
    tessera:{<uid>}:sessions    sorted set sid -> exp, the user's index

Every deleted session is published on `tessera:revocations` as {sid, sub, exp}.
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import asdict, dataclass

from redis.asyncio import Redis
from redis.exceptions import WatchError

REVOCATION_CHANNEL = "tessera:revocations"


@dataclass(frozen=True)
class SessionRecord:
    sid: str
    user_id: str
    token_hash: str
    created_at: int
    expires_at: int
    user_agent: str | None = None


def _session_key(user_id: str, sid: str) -> str:
    return f"tessera:{{{user_id}}}:s:{sid}"


def _index_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:sessions"


def _decode(raw: str | None) -> SessionRecord | None:
    if raw is None:
        return None
    try:
        return SessionRecord(**json.loads(raw))
    except (TypeError, ValueError):
        return None


class SessionStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def create(self, record: SessionRecord) -> None:
        now = int(time.time())
        ttl = max(1, record.expires_at - now)
        index = _index_key(record.user_id)
        # The index lives as long as the user's longest session (EXPIRE GT needs Redis 7).
        longest = await self.redis.zrange(index, -1, -1, withscores=True)
        index_ttl = max(ttl, int(longest[0][1]) - now if longest else 0)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(_session_key(record.user_id, record.sid), json.dumps(asdict(record)), ex=ttl)
            pipe.zadd(index, {record.sid: record.expires_at})
            pipe.zremrangebyscore(index, "-inf", now)
            pipe.expire(index, index_ttl)
            await pipe.execute()

    async def get(self, user_id: str, sid: str) -> SessionRecord | None:
        return _decode(await self.redis.get(_session_key(user_id, sid)))

    async def check(self, user_id: str, sid: str, token_hash: str) -> SessionRecord | None:
        """The session if it exists and was issued with exactly this token."""
        record = await self.get(user_id, sid)
        if record is None or not hmac.compare_digest(record.token_hash, token_hash):
            return None
        if record.expires_at <= time.time():
            return None
        return record

    async def check_with(self, user_id: str, sid: str, token_hash: str,
                         also: str) -> tuple[SessionRecord | None, str | None]:
        """`check`, reading one more key of the same user (same hash slot) in the same MGET."""
        raw, extra = await self.redis.mget([_session_key(user_id, sid), also])
        record = _decode(raw)
        if (record is None or not hmac.compare_digest(record.token_hash, token_hash)
                or record.expires_at <= time.time()):
            return None, None
        return record, extra

    async def list(self, user_id: str) -> list[SessionRecord]:
        sids = await self.redis.zrangebyscore(_index_key(user_id), int(time.time()), "+inf")
        if not sids:
            return []
        raws = await self.redis.mget([_session_key(user_id, sid) for sid in sids])
        records = [r for r in (_decode(raw) for raw in raws) if r is not None]
        return sorted(records, key=lambda r: r.created_at)

    async def delete(self, user_id: str, sid: str) -> bool:
        key = _session_key(user_id, sid)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(key)
            pipe.delete(key)
            pipe.zrem(_index_key(user_id), sid)
            raw, deleted, _ = await pipe.execute()
        record = _decode(raw)
        if deleted and record is not None:
            await self._publish([record])
        return bool(deleted)

    async def delete_all(self, user_id: str, *, keep_sid: str | None = None) -> int:
        """Delete every session of the user (but `keep_sid`), atomically against new logins."""
        index = _index_key(user_id)
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(index)
                    sids = [s for s in await pipe.zrange(index, 0, -1) if s != keep_sid]
                    if not sids:
                        await pipe.unwatch()
                        return 0
                    keys = [_session_key(user_id, s) for s in sids]
                    raws = await pipe.mget(keys)
                    pipe.multi()
                    pipe.delete(*keys)
                    pipe.zrem(index, *sids)
                    await pipe.execute()
                except WatchError:
                    continue
            records = [r for r in (_decode(raw) for raw in raws) if r is not None]
            await self._publish(records)
            return len(records)

    async def _publish(self, records: list[SessionRecord]) -> None:
        if not records:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for r in records:
                pipe.publish(REVOCATION_CHANNEL,
                             json.dumps({"sid": r.sid, "sub": r.user_id, "exp": r.expires_at}))
            await pipe.execute()
