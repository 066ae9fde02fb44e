"""Attempt counters in Redis, shared by every instance: fixed windows that expire by
themselves, so a flood backs off and a real user is never locked out for good.

An attempt is counted *before* the work it guards (one pipeline: SET NX EX, INCR), so
concurrent attempts cannot slip past the limit while a password is being hashed.
"""

from __future__ import annotations

import hashlib
import hmac

from tessera.errors import Problem
from tessera.stores.redis import AnyRedis

Limit = tuple[str, str, int]  # (kind, value, max attempts in the window)


class AttemptLimiter:
    def __init__(self, redis: AnyRedis, key: bytes) -> None:
        self.redis = redis
        self._key = key

    def _name(self, kind: str, value: str) -> str:
        # Pseudonymous: neither emails nor IPs are written to Redis in clear.
        digest = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:32]
        return f"tessera:rl:{kind}:{digest}"

    async def attempt(self, limits: list[Limit], window: int) -> None:
        """Count one attempt on every counter; 429 `too_many_attempts` if any is past its max."""
        names = [self._name(kind, value) for kind, value, _ in limits]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.set(name, 0, ex=window, nx=True)  # the window starts at the first attempt
                pipe.incr(name)
                pipe.ttl(name)
            results = await pipe.execute()
        for i, (_, _, maximum) in enumerate(limits):
            count, ttl = results[3 * i + 1], results[3 * i + 2]
            if int(count) > maximum:
                raise Problem("too_many_attempts", "Too many attempts; try again later.",
                              headers={"Retry-After": str(max(1, int(ttl)))})

    async def forgive_success(self, *, account: tuple[str, str], ip: tuple[str, str]) -> None:
        """A login that succeeded: clear the account's failures, take back this IP attempt
        (one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._name(*account))
            pipe.decr(self._name(*ip))
            await pipe.execute()

    async def forgive(self, kind: str, value: str, *, all_of_them: bool = False) -> None:
        """A success: take back this attempt (or every attempt counted so far)."""
        name = self._name(kind, value)
        if all_of_them:
            await self.redis.delete(name)
        else:
            await self.redis.decr(name)
