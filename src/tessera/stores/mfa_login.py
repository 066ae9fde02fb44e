"""The two-step login's state in Redis: the single-use `mfa_token`, the second factor's
attempt counters and the TOTP replay guard, all under the user's `{user-id}` hash tag,
beside the user's sessions (stores/sessions.py), so multi-key steps stay in one Redis
Cluster slot:

    tessera:{<uid>}:mfa:<sha256(mfa_token)>   hash: r = the record (JSON), n = tries so far,
                                              and for the one-script second step (`finish`):
                                              a = the first step's amr, e = the auth epoch
                                              and g = the profile generation read before
                                              the first step read the user, f = tracking
                                              flags, c<step> = the MAC of the TOTP code of
                                              each time step the token can be used in;
                                              TTL = the mfa_token's life
    tessera:{<uid>}:rl:mfa-account            wrong second factors of the account (a window)
    tessera:{<uid>}:mfa-pending               sorted set: the user's live mfa_token keys by
                                              expiry (erasure's list; trimmed at each put)
    tessera:{<uid>}:totp-steps                hash: TOTP factor id -> the last time step
                                              accepted (RFC 6238 5.2: a code is accepted
                                              once); outlives the drift window

A TOTP second step is one round trip (`finish`): the token read, the attempt counted, the
code's MAC compared, the time step taken, the token spent, the counter cleared and the
session written, in one script, when nothing about the user changed since the first step
(the same epoch and profile generation: every committed change to a user moves one of them,
after its commit). Anything else (a recovery code, a passkey, a changed user or factor, a
record written without the MACs) takes two: `begin` (read the token, count the attempt on
the token and on the account, *before* the check) and the session's creation, which also
takes the token and clears the account's counter (`SessionStore.create`, `take`, `forget`).
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
from tessera.stores.sessions import WRITE_SESSION, SessionRecord, SessionStore, epoch_key

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
# checked, ARGV[4] now (s), ARGV[5..] more fields of the token's hash (name, value, ...).
# Writes nothing (0) if the epoch moved since: no pending login outlives a change that ends
# sessions (an erasure may already have cleared the set).
_PUT = """
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'r', ARGV[1])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
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

# KEYS[1] the user's TOTP steps; ARGV[1] the factor id, ARGV[2] the time step, ARGV[3] the
# key's TTL: 1 (taken) if no equal or later step of that factor was accepted, else 0.
_ACCEPT_STEP = """
if (tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# The whole TOTP second step. KEYS: 1 the mfa_token, 2 the account's counter, 3 the auth
# epoch, 4 the profile generation, 5 the TOTP steps, 6-7 the session and the user's index.
# ARGV: 1 the account window (s), 2 the most tries per token, 3 per account, 4 the first
# step's amr the session's token was signed for, 5 the steps key's TTL, 6-10 the session
# (`SessionStore.write_args`), 11.. (time step, MAC of the code sent for it) pairs.
# Returns nil: unknown token (nothing counted); {1, ttl} past a limit (as `_BEGIN`, a token
# past its limit counts no attempt on the account); {2, record}: counted, and the full
# check decides (the user or factor changed, another amr, or a step without its MAC);
# {3, flags}: counted, a wrong code or a replay; {4, flags, sessions}: done.
_FINISH = WRITE_SESSION + """
local f = redis.call('HMGET', KEYS[1], 'r', 'a', 'e', 'g', 'f', 'k')
if not f[1] then return nil end
local tries = redis.call('HINCRBY', KEYS[1], 'n', 1)
if tries > tonumber(ARGV[2]) then return {1, redis.call('TTL', KEYS[1])} end
redis.call('SET', KEYS[2], 0, 'EX', ARGV[1], 'NX')
if redis.call('INCR', KEYS[2]) > tonumber(ARGV[3]) then return {1, redis.call('TTL', KEYS[2])} end
if f[2] ~= ARGV[4] or f[3] ~= (redis.call('GET', KEYS[3]) or '0')
    or f[4] ~= (redis.call('GET', KEYS[4]) or '') or not f[6] then
  return {2, f[1]}
end
local matched = nil
for i = 11, #ARGV, 2 do
  local mac = redis.call('HGET', KEYS[1], 'c' .. ARGV[i])
  if not mac then return {2, f[1]} end
  if mac == ARGV[i + 1] then matched = ARGV[i] end
end
if not matched or (tonumber(redis.call('HGET', KEYS[5], f[6])) or 0) >= tonumber(matched) then
  return {3, f[5]}
end
redis.call('HSET', KEYS[5], f[6], matched)
redis.call('EXPIRE', KEYS[5], ARGV[5])
redis.call('DEL', KEYS[1], KEYS[2])
return {4, f[5], write_session(KEYS[6], KEYS[7], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])}
"""

_scripts: weakref.WeakKeyDictionary[Any, tuple[AsyncScript, ...]] = (
    weakref.WeakKeyDictionary())
_BEGIN_SCRIPT, _COUNT_SCRIPT, _PUT_SCRIPT, _ACCEPT_STEP_SCRIPT, _FINISH_SCRIPT = range(5)


def _script(redis: AnyRedis, which: int) -> AsyncScript:
    registered = _scripts.get(redis)
    if registered is None:
        registered = _scripts[redis] = tuple(
            redis.register_script(text) for text in (_BEGIN, _COUNT, _PUT, _ACCEPT_STEP, _FINISH))
    return registered[which]


def token_key(user_id: str, mfa_token: str) -> str:
    return f"tessera:{{{user_id}}}:mfa:" + hashlib.sha256(mfa_token.encode()).hexdigest()


def account_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:rl:mfa-account"


def steps_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:totp-steps"


def factor_id(secret_enc: str) -> str:
    """A TOTP factor's id in the replay guard: of its stored (encrypted) secret, which a new
    enrolment replaces; a code of one factor is no code of another."""
    return hashlib.sha256(secret_enc.encode()).hexdigest()[:16]


# A step may be matched until the clock is one step past it (one step of drift), 90 s at
# most after it was accepted; it is remembered for 10 minutes, which also covers instances
# whose clocks disagree by minutes.
STEPS_TTL_SECONDS = 600


@dataclass(frozen=True)
class PendingLogin:
    """A live mfa_token's record, as `begin` read it (the attempt already counted)."""

    key: str  # the token's key: taken when the session is created
    user_id: str
    record: dict[str, Any]


def pending_key(user_id: str) -> str:
    return f"tessera:{{{user_id}}}:mfa-pending"


async def put(redis: AnyRedis, user_id: str, mfa_token: str, record: dict[str, Any],
               ttl: int, *, epoch: str, fields: dict[str, str] | None = None) -> bool:
    """Keep a pending second step, if the user's auth epoch is still `epoch` (False: a
    change that ends sessions came between; nothing written). `fields`: more fields of the
    token's hash (what `finish` reads)."""
    extra = [part for item in (fields or {}).items() for part in item]
    written = await _script(redis, _PUT_SCRIPT)(
        keys=[token_key(user_id, mfa_token), pending_key(user_id), epoch_key(user_id)],
        args=[json.dumps(record), ttl, epoch, int(time.time()), *extra])
    return bool(written)


async def forget(redis: AnyRedis, user_id: str) -> None:
    """The account is erased: its pending second steps go too (their records name the user
    and hold MACs of codes), not only the ones a later epoch would refuse, and so do its
    attempt counter and TOTP replay guard. Call it after the erasure's last epoch bump: a
    first step in flight then writes nothing (`put`)."""
    pending = pending_key(user_id)
    keys = [k.decode() if isinstance(k, bytes) else str(k)
            for k in await redis.zrange(pending, 0, -1)]
    for start in range(0, len(keys), 500):
        await redis.delete(*keys[start:start + 500])
    await redis.delete(pending, account_key(user_id), steps_key(user_id))


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


async def accept_step(redis: AnyRedis, user_id: str, factor: str, step: int) -> bool:
    """The replay guard (atomic across instances): take `step` of the TOTP factor `factor`
    (`factor_id`) as used if no equal or later step of it was accepted before."""
    taken = await _script(redis, _ACCEPT_STEP_SCRIPT)(
        keys=[steps_key(user_id)], args=[factor, step, STEPS_TTL_SECONDS])
    return bool(taken)


@dataclass(frozen=True)
class Finished:
    """What `finish` did. `done`: the session is written (`flags`: the tracking flags the
    first step recorded). `wrong`: a wrong or replayed code (counted). `pending`: counted,
    and the full check must decide, with this record (as `begin` hands it)."""

    done: bool = False
    wrong: bool = False
    flags: str = ""
    pending: PendingLogin | None = None


async def finish(redis: AnyRedis, sessions: SessionStore, user_id: str, mfa_token: str, *,
                 amr: str, macs: list[tuple[int, str]], session: SessionRecord,
                 generation_key: str, max_per_token: int, max_per_account: int,
                 window: int) -> Finished | None:
    """The TOTP second step in one round trip (the module's docstring): None for an
    unknown, used or expired token (nothing counted); 429 past a limit, as `begin`. `amr`:
    the first step's amr (JSON) the session's token was signed for; `macs`: the MAC of the
    code sent, for each time step it may be of; `session`: written if all holds;
    `generation_key`: the user's profile generation (domain/profiles.py), which every
    committed change to the user moves."""
    # The epoch and generation it trusts are Redis's: while Redis refuses writes, or the
    # deletions it refused (a deactivation's epoch bump, say) are not done yet, it fails
    # closed (503), as token checks do (stores/durability.py).
    sessions.writes.check()
    key = token_key(user_id, mfa_token)
    args: list[str | int] = [window, max_per_token, max_per_account, amr, STEPS_TTL_SECONDS,
                             *sessions.write_args(session)]
    for step, mac in macs:
        args += [step, mac]
    out = await _script(redis, _FINISH_SCRIPT)(
        keys=[key, account_key(user_id), epoch_key(user_id), generation_key,
              steps_key(user_id), *sessions.write_keys(session)], args=args)
    if out is None:
        return None
    outcome = int(out[0])
    if outcome == 1:
        raise too_many_attempts(int(out[1]))
    if outcome == 2:
        return Finished(pending=PendingLogin(key=key, user_id=user_id,
                                             record=json.loads(out[1])))
    flags = str(out[1]) if len(out) > 1 and out[1] is not None else ""
    if outcome == 3:
        return Finished(wrong=True, flags=flags)
    await sessions.trim(user_id, int(out[2]))
    return Finished(done=True, flags=flags)
