"""SessionStore: login sessions in Redis.

Layout (all of one user's keys share the `{user-id}` hash tag, so they live in one
Redis Cluster slot and multi-key updates can be atomic):

    tessera:{<uid>}:s:<sid>     JSON session record, TTL = the token's remaining life
    tessera:{<uid>}:sessions    sorted set sid -> exp, the user's index

Every deleted session is published on `tessera:revocations` as {sid, sub, exp}.

The same code runs on one Redis and on a Redis Cluster (`redis.asyncio.cluster.RedisCluster`):
multi-key steps touch one user's keys only, as MULTI/EXEC pipelines or a Lua script.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from redis.asyncio.cluster import RedisCluster

from tessera.stores.durability import WriteGate, is_write_refusal
from tessera.stores.redis import AnyRedis, ReadBatcher

REVOCATION_CHANNEL = "tessera:revocations"
# The oldest sessions of a user past this many are ended at the next login.
MAX_SESSIONS_PER_USER = 100

# Deletes the sessions KEYS[2..] (sids ARGV[2..]) if the index KEYS[1] still holds exactly
# them besides ARGV[1] (the kept sid), and returns their records; else returns nil and the
# caller reads the index again. An optimistic check-and-delete that, unlike WATCH/MULTI,
# also runs on a Redis Cluster (all keys share the user's hash tag, so one slot).
_DELETE_LISTED = """
local expected = {}
for i = 2, #ARGV do expected[ARGV[i]] = true end
local others = 0
for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if sid ~= ARGV[1] then
    if not expected[sid] then return nil end
    others = others + 1
  end
end
if others ~= #ARGV - 1 then return nil end
local records = {}
for i = 2, #KEYS do
  records[i - 1] = redis.call('GET', KEYS[i]) or false
  redis.call('DEL', KEYS[i])
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return records
"""


@dataclass(frozen=True)
class SessionRecord:
    sid: str
    user_id: str
    token_hash: str
    created_at: int
    expires_at: int
    user_agent: str | None = None
    # How and when the user authenticated (RFC 8176 amr); records written before these
    # fields existed decode with the defaults.
    amr: list[str] = field(default_factory=list)
    auth_time: int | None = None


def _session_key(user_id: str, sid: str) -> str:
    return f"tessera:{{{user_id}}}:s:{sid}"


def _index_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:sessions"


def _decode(raw: str | bytes | None) -> SessionRecord | None:
    if raw is None:
        return None
    try:
        return SessionRecord(**json.loads(raw))
    except (TypeError, ValueError):
        return None


class SessionStore:
    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        self.reads = ReadBatcher(redis)
        # Fails token checks closed while Redis refuses writes (stores/durability.py).
        self.writes = WriteGate(redis)
        self._delete_listed = redis.register_script(_DELETE_LISTED)

    async def create(self, record: SessionRecord) -> None:
        now = int(time.time())
        ttl = max(1, record.expires_at - now)
        index = _index_key(record.user_id)
        # The index lives as long as the user's longest session (EXPIRE GT needs Redis 7).
        longest = await self.redis.zrange(index, -1, -1, withscores=True)
        index_ttl = max(ttl, int(longest[0][1]) - now if longest else 0)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(_session_key(record.user_id, record.sid), json.dumps(asdict(record)), ex=ttl)
            # Score: the expiry, with the sub-second of creation so the oldest sorts first.
            pipe.zadd(index, {record.sid: record.expires_at + time.time() % 1})
            pipe.zremrangebyscore(index, "-inf", now)
            pipe.expire(index, index_ttl)
            pipe.zcard(index)
            *_, count = await pipe.execute()
        if count > MAX_SESSIONS_PER_USER:  # a login loop must not grow a user's sessions forever
            for sid in await self.redis.zrange(index, 0, count - MAX_SESSIONS_PER_USER - 1):
                await self.delete(record.user_id, str(sid))

    async def get(self, user_id: str, sid: str) -> SessionRecord | None:
        return _decode(await self.redis.get(_session_key(user_id, sid)))

    async def check(self, user_id: str, sid: str, token_hash: str) -> SessionRecord | None:
        """The session if it exists and was issued with exactly this token."""
        self.writes.check()
        record = await self.get(user_id, sid)
        if record is None or not hmac.compare_digest(record.token_hash, token_hash):
            return None
        if record.expires_at <= time.time():
            return None
        return record

    async def check_with(self, user_id: str, sid: str, token_hash: str,
                         also: str) -> tuple[SessionRecord | None, str | None]:
        """`check`, reading one more key of the same user (same hash slot) in the same MGET."""
        self.writes.check()
        raw, extra = await self.reads.mget([_session_key(user_id, sid), also])
        record = _decode(raw)
        if (record is None or not hmac.compare_digest(record.token_hash, token_hash)
                or record.expires_at <= time.time()):
            return None, None
        return record, extra if isinstance(extra, str) else None

    async def list(self, user_id: str) -> list[SessionRecord]:
        sids = await self.redis.zrangebyscore(_index_key(user_id), int(time.time()), "+inf")
        if not sids:
            return []
        raws = await self.redis.mget([_session_key(user_id, str(sid)) for sid in sids])
        records = [r for r in (_decode(raw) for raw in raws) if r is not None]
        return sorted(records, key=lambda r: r.created_at)

    async def delete(self, user_id: str, sid: str) -> bool:
        """Delete one session. If Redis refuses the write (503), token checks fail closed
        until it is done (WriteGate)."""
        try:
            return await self._delete(user_id, sid)
        except Exception as exc:
            if is_write_refusal(exc):
                self.writes.refused(exc, lambda: self._delete(user_id, sid))
            raise

    async def _delete(self, user_id: str, sid: str) -> bool:
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
        try:
            return await self._delete_all(user_id, keep_sid)
        except Exception as exc:
            if is_write_refusal(exc):
                self.writes.refused(exc, lambda: self._delete_all(user_id, keep_sid))
            raise

    async def _delete_all(self, user_id: str, keep_sid: str | None) -> int:
        index = _index_key(user_id)
        while True:
            sids = [s for s in map(str, await self.redis.zrange(index, 0, -1)) if s != keep_sid]
            if not sids:
                return 0
            raws = await self._delete_listed(
                keys=[index, *(_session_key(user_id, s) for s in sids)],
                args=[keep_sid or "", *sids])
            if raws is None:
                continue  # a login or logout changed the index meanwhile
            records = [r for r in (_decode(raw) for raw in raws) if r is not None]
            await self._publish(records)
            return len(records)

    async def _publish(self, records: Sequence[SessionRecord]) -> None:
        if not records:
            return
        messages = [json.dumps({"sid": r.sid, "sub": r.user_id, "exp": r.expires_at})
                    for r in records]
        if isinstance(self.redis, RedisCluster):  # a cluster pipeline refuses PUBLISH
            for message in messages:
                await self.redis.publish(REVOCATION_CHANNEL, message)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.publish(REVOCATION_CHANNEL, message)
            await pipe.execute()
