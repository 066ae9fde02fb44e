"""Attempt counters in Redis, shared by every instance: fixed windows that expire by themselves,
so a flood backs off and a real user is never locked out for good."""

from __future__ import annotations

import hashlib
import hmac

from redis.asyncio import Redis

from app.errors import Problem


class AttemptLimiter:
    def __init__(self, redis: Redis, key: bytes) -> None:
        self.redis = redis
        self._key = key

    def _name(self, kind: str, value: str) -> str:
        # Pseudonymous: neither emails nor IPs are written to Redis in clear.
        digest = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:32]
        return f"tessera:rl:{kind}:{digest}"

    async def check(self, limits: list[tuple[str, str, int]]) -> None:
        """limits: (kind, value, max). 429 `too_many_attempts` if any counter is at its max."""
        names = [self._name(kind, value) for kind, value, _ in limits]
        counts = await self.redis.mget(names)
        for (_, _, maximum), name, count in zip(limits, names, counts, strict=True):
            if count is not None and int(count) >= maximum:
                ttl = await self.redis.ttl(name)
                retry = str(max(1, ttl))
                raise Problem(429, "too_many_attempts", "Too many attempts; try again later.",
                              headers={"Retry-After": retry})

    async def hit(self, limits: list[tuple[str, str, int]], window: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for kind, value, _ in limits:
                name = self._name(kind, value)
                # SET NX EX then INCR: the window starts at the first attempt (Redis 6.2+).
                pipe.set(name, 0, ex=window, nx=True)
                pipe.incr(name)
            await pipe.execute()

    async def clear(self, kind: str, value: str) -> None:
        await self.redis.delete(self._name(kind, value))
