"""The two-step login's state in Redis: the single-use `mfa_token` and the second factor's
attempt counters, all under the user's `{user-id}` hash tag, beside the user's sessions
(stores/sessions.py), so multi-key steps stay in one Redis Cluster slot:

    tessera:{<uid>}:mfa:<sha256(mfa_token)>   hash: r = the record (JSON), n = tries so far;
                                              TTL = the mfa_token's life
    tessera:{<uid>}:rl:mfa-account            wrong second factors of the account (a window)
    tessera:{<uid>}:mfa-pending               sorted set: the user's live mfa_token keys by
                                              expiry (erasure's list; trimmed at each put)

A second step costs two round trips, both writes: `begin` (read the token, count the attempt
on the token and on the account, *before* the check) and the session's creation, which also
takes the token (single use) and clears the account's counter in the same script
(`SessionStore.create`, `take` and `forget`).
"""

from __future__ import annotations

import hashlib
import json
import time
import weakref
from dataclasses import dataclass
from typing import Any

from redis.commands.core import AsyncScript

from tessera.stores.ratelimit import too_many_attempts
from tessera.stores.redis import AnyRedis
from tessera.stores.sessions import epoch_key

# KEYS[1] the mfa_token, KEYS[2] the account's counter; ARGV[1] the account window (s),
# ARGV[2] the most tries per token. nil for an unknown token (nothing counted); else
# {record, tries on the token, the token's TTL, attempts of the account, its TTL}; a token
# past its limit counts no further attempt on the account (as when two limiters ran apart).
_BEGIN = """
local record = redis.call('HGET', KEYS[1], 'r')
if not record then return nil end
local tries = redis.call('HINCRBY', KEYS[1], 'n', 1)
if tries > tonumber(ARGV[2]) then return {record, tries, redis.call('TTL', KEYS[1]), 0, 0} end
redis.call('SET', KEYS[2], 0, 'EX', ARGV[1], 'NX')
local count = redis.call('INCR', KEYS[2])
return {record, tries, redis.call('TTL', KEYS[1]), count, redis.call('TTL', KEYS[2])}
"""

# KEYS[1] the mfa_token, KEYS[2] the user's pending set, KEYS[3] the user's auth epoch;
# ARGV[1] the record, ARGV[2] its TTL, ARGV[3] the epoch read before the first factor was
# checked, ARGV[4] now (s). Writes nothing (0) if the epoch moved since: no pending login
# outlives a change that ends sessions (an erasure may already have cleared the set).
_PUT = """
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'r', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[2]), KEYS[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1] the account's counter; ARGV[1] the window: {attempts, TTL}.
_COUNT = """
redis.call('SET', KEYS[1], 0, 'EX', ARGV[1], 'NX')
return {redis.call('INCR', KEYS[1]), redis.call('TTL', KEYS[1])}
"""

_scripts: weakref.WeakKeyDictionary[Any, tuple[AsyncScript, ...]] = (
    weakref.WeakKeyDictionary())
_BEGIN_SCRIPT, _COUNT_SCRIPT, _PUT_SCRIPT = range(3)


def _script(redis: AnyRedis, which: int) -> AsyncScript:
    registered = _scripts.get(redis)
    if registered is None:
        registered = _scripts[redis] = tuple(
            redis.register_script(text) for text in (_BEGIN, _COUNT, _PUT))
    return registered[which]


def token_key(user_id: str, mfa_token: str) -> str:
    return f"tessera:{{{user_id}}}:mfa:" + hashlib.sha256(mfa_token.encode()).hexdigest()


def account_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:rl:mfa-account"


@dataclass(frozen=True)
class PendingLogin:
    """A live mfa_token's record, as `begin` read it (the attempt already counted)."""

    key: str  # the token's key: taken when the session is created
    user_id: str
    record: dict[str, Any]


def pending_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:mfa-pending"


async def put(redis: AnyRedis, user_id: str, mfa_token: str, record: dict[str, Any],
               ttl: int, *, epoch: str) -> bool:
    """Keep a pending second step, if the user's auth epoch is still `epoch` (False: a
    change that ends sessions came between; nothing written)."""
    written = await _script(redis, _PUT_SCRIPT)(
        keys=[token_key(user_id, mfa_token), pending_key(user_id), epoch_key(user_id)],
        args=[json.dumps(record), ttl, epoch, int(time.time())])
    return bool(written)


async def forget(redis: AnyRedis, user_id: str) -> None:
    """The account is erased: its pending second steps go too (their records hold the
    sealed TOTP secret), not only the ones a later epoch would refuse. Call it after the
    erasure's last epoch bump: a first step in flight then writes nothing (`put`)."""
    pending = pending_key(user_id)
    keys = [k.decode() if isinstance(k, bytes) else str(k)
            for k in await redis.zrange(pending, 0, -1)]
    for start in range(0, len(keys), 500):
        await redis.delete(*keys[start:start + 500])
    await redis.delete(pending)


async def begin(redis: AnyRedis, user_id: str, mfa_token: str, *, max_per_token: int,
                max_per_account: int, window: int) -> PendingLogin | None:
    """One round trip, before the factor is checked: the token's record (None: unknown, used
    or expired) with this attempt counted on the token and on the account; 429 past either
    limit."""
    key = token_key(user_id, mfa_token)
    out = await _script(redis, _BEGIN_SCRIPT)(
        keys=[key, account_key(user_id)], args=[window, max_per_token])
    if out is None:
        return None
    raw, tries, token_ttl, count, account_ttl = out
    if int(tries) > max_per_token:
        raise too_many_attempts(int(token_ttl))
    if int(count) > max_per_account:
        raise too_many_attempts(int(account_ttl))
    return PendingLogin(key=key, user_id=user_id, record=json.loads(raw))


async def count_account_attempt(redis: AnyRedis, user_id: str, *, maximum: int,
                                window: int) -> None:
    """An attempt at a second factor outside the login (enrolment, sensitive changes):
    counted on the same per-account counter as the login's; 429 past `maximum`."""
    count, ttl = await _script(redis, _COUNT_SCRIPT)(keys=[account_key(user_id)], args=[window])
    if int(count) > maximum:
        raise too_many_attempts(int(ttl))


async def forgive_account(redis: AnyRedis, user_id: str) -> None:
    await redis.delete(account_key(user_id))
