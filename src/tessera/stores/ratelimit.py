"""Attempt counters in Redis, shared by every instance: fixed windows that expire by
themselves, so a flood backs off and a real user is never locked out for good.

An attempt is counted *before* the work it guards (one pipeline: SET NX EX, INCR), so
concurrent attempts cannot slip past the limit while a password is being hashed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from tessera.errors import Problem
from tessera.stores.redis import AnyRedis

# (kind, value, max attempts in the window) or (kind, value, max, own window in seconds)
Limit = tuple[str, str, int] | tuple[str, str, int, int]


def ip_bucket(address: str) -> str:
    """What a per-IP limit counts: an IPv4 address, or an IPv6 address's /64 (one customer
    usually holds a whole /64, so counting its addresses one by one would not limit it).
    An IPv4-mapped IPv6 address counts as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def too_many_attempts(ttl: int) -> Problem:
    """429, with how long until the window that is full ends."""
    return Problem("too_many_attempts", "Too many attempts; try again later.",
                   headers={"Retry-After": str(max(1, int(ttl)))})


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
        async with self.redis.pipeline(transaction=False) as pipe:
            for limit in limits:
                name = self._name(limit[0], limit[1])
                # the window starts at the first attempt
                pipe.set(name, 0, ex=limit[3] if len(limit) == 4 else window, nx=True)
                pipe.incr(name)
                pipe.ttl(name)
            results = await pipe.execute()
        for i, limit in enumerate(limits):
            maximum = limit[2]
            count, ttl = results[3 * i + 1], results[3 * i + 2]
            if int(count) > maximum:
                raise too_many_attempts(ttl)

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
