"""SessionStore: login sessions in Redis.

Layout (all of one user's keys share the `{user-id}` hash tag, so they live in one
Redis Cluster slot and multi-key updates can be atomic):

    tessera:{<uid>}:s:<sid>     JSON session record, TTL = the token's remaining life
    tessera:{<uid>}:sessions    sorted set sid -> exp, the user's index
    tessera:{<uid>}:epoch       the user's auth epoch: bumped by every change that ends
                                sessions (password, deactivation, deletion, erasure, ...)

A login reads the epoch before it reads the user and verifies the password, and its session
is written only if the epoch is still the same (one Lua script): a change that commits and
then ends the user's sessions (bumping the epoch in the same script) either deletes the new
session or makes its creation fail. So no session outlives the credentials or the account
state it was issued for (issue 12.1).

Every deleted session is published on `tessera:revocations` as {sid, sub, exp}.

The same code runs on one Redis and on a Redis Cluster (`redis.asyncio.cluster.RedisCluster`):
multi-key steps touch one user's keys only, as MULTI/EXEC pipelines or a Lua script.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.asyncio.cluster import RedisCluster

from tessera.stores.durability import DbFactory, Deletion, WriteGate, is_write_refusal
from tessera.stores.memo import Memo
from tessera.stores.redis import AnyRedis, ReadBatcher

REVOCATION_CHANNEL = "tessera:revocations"
# The oldest sessions of a user past this many are ended at the next login.
MAX_SESSIONS_PER_USER = 100

# The epoch outlives any login in flight by far; it needs no longer life (an expired epoch
# reads as "0", and a bump since a login read it still makes the epochs differ for a day).
EPOCH_TTL_SECONDS = 86400

# Deletes the sessions KEYS[3..] (sids ARGV[3..]) if the index KEYS[1] still holds exactly
# them besides ARGV[1] (the kept sid), bumps the epoch KEYS[2] (TTL ARGV[2]) and returns
# their records; else returns nil and the caller reads the index again. An optimistic
# check-and-delete that, unlike WATCH/MULTI, also runs on a Redis Cluster (all keys share the
# user's hash tag, so one slot).
_DELETE_LISTED = """
local expected = {}
for i = 3, #ARGV do expected[ARGV[i]] = true end
local others = 0
for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if sid ~= ARGV[1] then
    if not expected[sid] then return nil end
    others = others + 1
  end
end
if others ~= #ARGV - 2 then return nil end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
local records = {}
for i = 3, #KEYS do
  records[i - 2] = redis.call('GET', KEYS[i]) or false
  redis.call('DEL', KEYS[i])
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return records
"""

# Deletes the session KEYS[1] and its entry ARGV[1] in the index KEYS[2]; if it existed,
# publishes {"sid", "sub", "exp"} on the revocation channel ARGV[2]. Returns 1 or 0.
_DELETE_ONE = """
local raw = redis.call('GET', KEYS[1])
local deleted = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if deleted == 1 and raw then
  local ok, record = pcall(cjson.decode, raw)
  if ok and type(record) == 'table' and type(record.expires_at) == 'number' then
    redis.call('PUBLISH', ARGV[2], string.format('{"sid":%s,"sub":%s,"exp":%d}',
      cjson.encode(record.sid), cjson.encode(record.user_id), record.expires_at))
  end
end
return deleted
"""

# The Lua that writes a session: the record (TTL `ttl`) and its entry in the user's index
# (sid -> score, the expiry), the index trimmed of expired entries and kept as long as its
# longest-lived session; returns the number of the user's live sessions. Shared by `_CREATE`
# and the second login step's one script (stores/mfa_login.py); `SessionStore.write_args`
# gives its arguments.
WRITE_SESSION = """
local function write_session(session_key, index_key, record, ttl, sid, score, now)
  ttl = tonumber(ttl)
  now = tonumber(now)
  redis.call('SET', session_key, record, 'EX', ttl)
  redis.call('ZADD', index_key, score, sid)
  redis.call('ZREMRANGEBYSCORE', index_key, '-inf', now)
  local longest = redis.call('ZRANGE', index_key, -1, -1, 'WITHSCORES')
  local index_ttl = ttl
  if longest[2] then
    local rest = math.floor(tonumber(longest[2])) - now
    if rest > index_ttl then index_ttl = rest end
  end
  redis.call('EXPIRE', index_key, index_ttl)
  return redis.call('ZCARD', index_key)
end
"""

# Writes the session KEYS[2] and indexes it in KEYS[3] (ARGV[2..6]: `write_args`) only if
# the epoch KEYS[1] is still ARGV[1]; returns the number of the user's live sessions, or -1
# (nothing written) if the epoch moved. With ARGV[7] = '1', KEYS[4] is a single-use key of
# the user's (the mfa_token of a second login step): it is deleted first, and if it was
# gone already, -2 and nothing else happens; KEYS[5..] (the step's attempt counter) are
# deleted with the session's creation.
_CREATE = WRITE_SESSION + """
if ARGV[7] == '1' and redis.call('DEL', KEYS[4]) == 0 then return -2 end
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return -1 end
for i = 5, #KEYS do redis.call('DEL', KEYS[i]) end
return write_session(KEYS[2], KEYS[3], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""


class AlreadyTaken(Exception):
    """`create(take=...)`: the single-use key was used (or expired) meanwhile."""


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


def epoch_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:epoch"


def _decode(raw: str | bytes | None) -> SessionRecord | None:
    if raw is None:
        return None
    try:
        return SessionRecord(**json.loads(raw))
    except (TypeError, ValueError):
        return None


class SessionStore:
    def __init__(self, redis: AnyRedis, db_factory: DbFactory | None = None) -> None:
        self.redis = redis
        self.reads = ReadBatcher(redis)
        self._records: Memo[str, SessionRecord] = Memo()  # raw record -> decoded (memo.py)
        # Fails token checks closed while Redis refuses writes, and keeps the refused
        # deletions in the database until one instance does them (stores/durability.py).
        self.writes = WriteGate(redis, db_factory)
        self.writes.register("session", lambda user_id, sid: self._delete(user_id, sid or ""))
        self.writes.register("sessions", self._delete_all)
        self._delete_listed = redis.register_script(_DELETE_LISTED)
        self._create = redis.register_script(_CREATE)
        self._delete_one = redis.register_script(_DELETE_ONE)

    async def epoch(self, user_id: str) -> str:
        """The user's auth epoch: read before the credentials are checked, handed to `create`."""
        raw = await self.redis.get(epoch_key(user_id))
        return str(raw) if raw is not None else "0"

    async def epoch_with(self, user_id: str, also: str) -> tuple[str, str | None]:
        """`epoch`, and one more key of the same user (same hash slot) in the same MGET:
        the first login step reads the profile generation with it."""
        epoch, extra = await self.redis.mget([epoch_key(user_id), also])
        return (str(epoch) if epoch is not None else "0",
                str(extra) if extra is not None else None)

    @staticmethod
    def write_keys(record: SessionRecord) -> list[str]:
        """The keys `WRITE_SESSION`'s `write_session` writes: the session, the index."""
        return [_session_key(record.user_id, record.sid), _index_key(record.user_id)]

    @staticmethod
    def write_args(record: SessionRecord) -> list[str | int]:
        """`write_session`'s arguments after its two keys: the record, its TTL, the sid,
        the score (the expiry, with the sub-second of creation so the oldest sorts first),
        now."""
        now = int(time.time())
        # vars, not asdict: the fields are plain values (asdict deep-copies them, slowly)
        return [json.dumps(vars(record)), max(1, record.expires_at - now), record.sid,
                repr(record.expires_at + time.time() % 1), now]

    async def create(self, record: SessionRecord, *, epoch: str, take: str | None = None,
                     forget: Sequence[str] = ()) -> bool:
        """Write the session if the user's epoch is still `epoch`; False (nothing written) if a
        change that ends sessions happened since it was read. `take`: a single-use key of the
        same user (hash tag), deleted in the same script; `AlreadyTaken` (nothing written) if
        it was gone. `forget` (with `take`): keys of the same user deleted with the session's
        creation."""
        keys = [epoch_key(record.user_id), *self.write_keys(record)]
        if take is not None:
            keys += [take, *forget]
        count = int(await self._create(
            keys=keys, args=[epoch, *self.write_args(record), "1" if take else "0"]))
        if count == -2:
            raise AlreadyTaken()
        if count < 0:
            return False
        await self.trim(record.user_id, count)
        return True

    async def trim(self, user_id: str, count: int) -> None:
        """After a session was written and the user has `count`: a login loop must not grow
        a user's sessions forever (the oldest past MAX_SESSIONS_PER_USER end)."""
        if count > MAX_SESSIONS_PER_USER:
            for sid in await self.redis.zrange(_index_key(user_id), 0,
                                               count - MAX_SESSIONS_PER_USER - 1):
                await self.delete(user_id, str(sid))

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
        record = self._records.get(raw) if isinstance(raw, str) else None
        if record is None:
            record = _decode(raw)
            if record is None:
                return None, None
            if record.user_id == user_id and record.sid == sid:
                self._records.put(raw, record)
        if (record.user_id != user_id or record.sid != sid
                or not hmac.compare_digest(record.token_hash, token_hash)
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
        """Delete one session. If Redis refuses the write (503), the deletion is kept in the
        database and no instance accepts a session until one has done it (WriteGate)."""
        try:
            return await self._delete(user_id, sid)
        except Exception as exc:
            if is_write_refusal(exc):
                await self.writes.refused(exc, Deletion("session", user_id, sid))
            raise

    async def _delete(self, user_id: str, sid: str) -> bool:
        # One round trip: delete, unindex and tell the revocation feed (a logout is on the
        # request's path, and each write round trip waits for Redis's fsync).
        return bool(await self._delete_one(
            keys=[_session_key(user_id, sid), _index_key(user_id)],
            args=[sid, REVOCATION_CHANNEL]))

    async def delete_all(self, user_id: str, *, keep_sid: str | None = None) -> int:
        """Delete every session of the user (but `keep_sid`) and bump the user's epoch, in one
        script: a login in flight since before this call gets no session (see `create`)."""
        try:
            return await self._delete_all(user_id, keep_sid)
        except Exception as exc:
            if is_write_refusal(exc):
                await self.writes.refused(exc, Deletion("sessions", user_id, keep_sid))
            raise

    async def _delete_all(self, user_id: str, keep_sid: str | None) -> int:
        index = _index_key(user_id)
        while True:
            sids = [s for s in map(str, await self.redis.zrange(index, 0, -1)) if s != keep_sid]
            raws = await self._delete_listed(
                keys=[index, epoch_key(user_id), *(_session_key(user_id, s) for s in sids)],
                args=[keep_sid or "", EPOCH_TTL_SECONDS, *sids])
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
