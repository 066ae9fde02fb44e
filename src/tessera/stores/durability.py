"""Can Redis keep a logout? Its persistence config, and whether it takes writes now.

A logout deletes the session key. On a Redis that only snapshots (the default `save`
points, or none), a crash of redis-server brings back every session deleted since the
last snapshot: logged-out tokens work again. An append-only file with `appendfsync
always` (the embedded server's setting) or `everysec` keeps each acknowledged delete
across a crash of redis-server (Redis writes the AOF before it answers; `everysec` may
lose the last second or two only if the host itself goes down).

`TESSERA_REDIS_DURABILITY`: `require` (default) checks with CONFIG GET at start (refusing
to start) and in /readyz (not ready); `trusted` skips the check for a Redis that refuses
CONFIG but is known to persist (a managed service); `off` accepts a Redis that may forget
logouts (development).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar, Token
from typing import Any

import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from tessera.stores.redis import AnyRedis

log = logging.getLogger("tessera.redis")

DURABLE_FSYNC = ("always", "everysec")
PROBE_KEY = "tessera:readyz:"


def _persistence_problem(config: Mapping[Any, Any]) -> str | None:
    appendonly = str(config.get("appendonly", "")).lower()
    fsync = str(config.get("appendfsync", "")).lower()
    if appendonly != "yes":
        return ("Redis has no append-only file (appendonly no): a logout would not survive a "
                "Redis crash; set appendonly yes with appendfsync always or everysec, or "
                "TESSERA_REDIS_DURABILITY=off to accept that")
    if fsync not in DURABLE_FSYNC:
        return (f"Redis writes its append-only file with appendfsync {fsync or '?'}: set "
                "appendfsync always or everysec, or TESSERA_REDIS_DURABILITY=off to accept that")
    return None


async def persistence_problem(client: AnyRedis) -> str | None:
    """None if every (primary) Redis node keeps acknowledged writes across its own crash;
    else one line saying why not. Connection errors propagate (Redis is down)."""
    try:
        if isinstance(client, RedisCluster):
            for node in client.get_primaries():
                config = await client.config_get("append*", target_nodes=node)
                problem = _persistence_problem(config)
                if problem:
                    return f"{problem} (node {node.name})"
            return None
        return _persistence_problem(await client.config_get("append*"))
    except redis.exceptions.ResponseError as exc:  # CONFIG renamed, or not allowed (ACL)
        if isinstance(exc, _WRITE_REFUSALS):
            raise
        return ("Redis refuses CONFIG GET, so tessera cannot check that a logout survives a "
                "Redis crash: if it persists every write (append-only file, fsynced), set "
                "TESSERA_REDIS_DURABILITY=trusted")


class RedisNotDurable(RuntimeError):
    """Raised at start-up under TESSERA_REDIS_DURABILITY=require."""


async def require_durable_redis(client: AnyRedis) -> None:
    """At start: refuse a Redis that would forget logouts (a Redis down now is let be: the
    requests answer 503 and /readyz says so until it is back)."""
    try:
        problem = await persistence_problem(client)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        log.warning("Redis is not reachable at start; its persistence is checked by /readyz")
        return
    if problem:
        log.error("refusing to start: %s", problem)
        raise RedisNotDurable(problem)


def durability_problem_sync(url: str) -> str | None:
    """`persistence_problem` for the command line, before the server starts."""
    import asyncio

    from tessera.stores.redis import create_redis

    async def run() -> str | None:
        client = create_redis(url)
        try:
            return await persistence_problem(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


async def write_problem(client: AnyRedis) -> str | None:
    """None if Redis accepts a write now (a key of 5 s); else its refusal (MISCONF: a failed
    snapshot on a full disk, READONLY: a replica, OOM: maxmemory). Connection errors
    propagate."""
    try:
        await client.set(PROBE_KEY + secrets.token_hex(4), "1", ex=5)
    except redis.exceptions.ResponseError as exc:
        return f"Redis refuses writes: {str(exc).split(chr(10))[0][:200]}"
    return None


# Error replies that mean "Redis takes no writes now": 503 `unavailable`, never a 500.
_WRITE_REFUSALS: tuple[type[Exception], ...] = (
    redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError)


def is_write_refusal(exc: BaseException) -> bool:
    """MISCONF (a snapshot failed, stop-writes-on-bgsave-error), READONLY, OOM."""
    if isinstance(exc, _WRITE_REFUSALS):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        message = str(exc)
        # A refusal inside a script comes back wrapped ("... MISCONF ..."): look for the code.
        return any(code in message for code in _REFUSAL_CODES)
    return False


_REFUSAL_CODES = ("MISCONF", "READONLY", "OOM command not allowed", "NOREPLICAS",
                  "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN")


class WritesRefused(Exception):
    """Redis refuses writes: a session may be impossible to end, so none is accepted."""


Replay = Callable[[], Awaitable[Any]]


# Set for requests that end sessions (logout, logout-all, deactivate, DELETE /me): their
# token is still checked while writes are refused, so that the deletion is attempted and,
# refused, kept for the replay: a user can always end a session.
_ENDING_SESSIONS: ContextVar[bool] = ContextVar("tessera_ending_sessions", default=False)


def ending_sessions(on: bool) -> Token[bool]:
    """Set by the edge, before its token check, for the session-ending routes."""
    return _ENDING_SESSIONS.set(on)


def reset_ending_sessions(token: Token[bool]) -> None:
    _ENDING_SESSIONS.reset(token)


class WriteGate:
    """Fails closed while Redis refuses writes (MISCONF on a full disk, READONLY, OOM).

    A logout that cannot delete its session answers 503 and would leave the token valid.
    So once a write is refused (or the probe below finds writes refused), token checks of
    this process raise `WritesRefused` (503 `unavailable`) until a write works again.
    The refused deletions (a logout, a logout-all, a deactivation's profile) are kept in
    memory and replayed before the first token is accepted again. Every `PROBE_SECONDS`
    a token check starts one probe write in the background, so every instance on a Redis
    that refuses writes stops accepting sessions within about that long, not just the one
    whose logout failed.
    """

    PROBE_SECONDS = 1.0

    def __init__(self, client: AnyRedis) -> None:
        self.redis = client
        self.failing = False
        self.reason = ""
        self._checked = time.monotonic()
        self._pending: list[Replay] = []
        self._probe: asyncio.Task[None] | None = None

    def refused(self, exc: BaseException, replay: Replay | None = None) -> None:
        if not self.failing:
            log.error("Redis refuses writes; no session is accepted until it takes them "
                      "again: %s", str(exc).split("\n")[0][:200])
        self.failing = True
        self.reason = str(exc).split("\n")[0][:200]
        self._checked = time.monotonic()
        if replay is not None:
            self._pending.append(replay)

    def succeeded(self) -> None:
        """A write worked (the probe, /readyz): clear once the refused deletions are done."""
        self._checked = time.monotonic()
        if self.failing and not self._pending:
            self.failing = False
            log.warning("Redis takes writes again; sessions are accepted again")

    def check(self) -> None:
        """On every token check: cheap (a clock read) unless a probe is due."""
        now = time.monotonic()
        if now - self._checked >= self.PROBE_SECONDS and self._probe is None:
            self._checked = now
            self._probe = asyncio.ensure_future(self._run_probe())
        if self.failing and not _ENDING_SESSIONS.get():
            raise WritesRefused(self.reason)

    async def _run_probe(self) -> None:
        try:
            problem = await write_problem(self.redis)
            if problem is not None:
                self.refused(RuntimeError(problem))
                return
            while self._pending:  # replay the refused deletions, oldest first
                replay = self._pending[0]
                try:
                    await replay()
                except Exception as exc:
                    if is_write_refusal(exc):
                        self.refused(exc)
                        return
                    raise
                self._pending.pop(0)
            self.succeeded()
        except Exception as exc:  # Redis down: the token checks fail on their own (503)
            log.debug("redis write probe failed: %s", type(exc).__name__)
        finally:
            self._probe = None
