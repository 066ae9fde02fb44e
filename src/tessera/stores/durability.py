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
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from tessera.stores.redis import AnyRedis

log = logging.getLogger("tessera.redis")

DURABLE_FSYNC = ("always", "everysec")
PROBE_KEY = "tessera:readyz:"
# A random id written once into a Redis data set: a refused deletion is done only by the
# instances on the Redis that refused it (two deployments may share one database).
DATASET_KEY = "tessera:dataset"


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
    policy = str(config.get("maxmemory-policy", "noeviction")).lower()
    if str(config.get("maxmemory", "0")) != "0" and policy != "noeviction":
        # Sessions, epochs, attempt counters and the TOTP replay guard all live in Redis:
        # an evicted epoch or guard is a check forgotten, not a cache miss.
        return (f"Redis may evict keys (maxmemory-policy {policy} with a maxmemory set): "
                "a logout, an attempt counter or a TOTP replay guard could be forgotten; "
                "set maxmemory-policy noeviction (or maxmemory 0), or "
                "TESSERA_REDIS_DURABILITY=off to accept that")
    return None


async def _config(client: AnyRedis, **node: Any) -> dict[Any, Any]:
    """The settings `_persistence_problem` reads (of one cluster node, with `target_nodes`)."""
    config = dict(await client.config_get("append*", **node))
    config.update(await client.config_get("maxmemory*", **node))
    return config


async def persistence_problem(client: AnyRedis) -> str | None:
    """None if every (primary) Redis node keeps acknowledged writes across its own crash;
    else one line saying why not. Connection errors propagate (Redis is down)."""
    try:
        if isinstance(client, RedisCluster):
            for node in client.get_primaries():
                problem = _persistence_problem(await _config(client, target_nodes=node))
                if problem:
                    return f"{problem} (node {node.name})"
            return None
        return _persistence_problem(await _config(client))
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


@dataclass(frozen=True)
class Deletion:
    """A deletion Redis refused: `kind` names the store's executor (see `PendingDeletion`)."""

    kind: str
    user_id: str
    arg: str | None = None


Executor = Callable[[str, str | None], Awaitable[Any]]
DbFactory = Callable[[], Any]  # async_sessionmaker[AsyncSession]


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
    """Fails closed while Redis refuses writes (MISCONF on a full disk, READONLY, OOM), on
    every instance, and does the refused deletions once Redis takes writes again.

    A logout that cannot delete its session answers 503 and would leave the token valid.
    So a refused deletion (a logout, a logout-all, a deactivation's profile) is written to
    the database (`pending_deletions`) before the 503 goes out, and token checks raise
    `WritesRefused` (503 `unavailable`) while any is not done. Every instance runs the
    same background loop: every `PROBE_SECONDS` one probe write to Redis (a refusal: this
    instance accepts no session from then on, whether or not a request of its own failed)
    and one read of `pending_deletions`; when Redis takes writes, the instance does the
    deletions it finds (its own and those of any other instance, one that crashed
    included; each is idempotent), deletes their rows and only then accepts sessions
    again. At start-up the same step runs before the first request. The token check
    itself reads nothing (`check`: one attribute); a deletion the database could not
    take either is kept in this process's memory (and logged).
    """

    PROBE_SECONDS = 1.0
    JOURNAL_TIMEOUT_SECONDS = 5.0
    BATCH = 200

    def __init__(self, client: AnyRedis, db_factory: DbFactory | None = None) -> None:
        self.redis = client
        self.db_factory = db_factory
        self.failing = False
        self.reason = ""
        self._memory: list[Deletion] = []  # refused deletions the database did not take
        self._executors: dict[str, Executor] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.dataset: str | None = None  # DATASET_KEY's value, once read

    async def _dataset(self) -> str | None:
        if self.dataset is None:
            try:
                with contextlib.suppress(redis.exceptions.ResponseError):  # writes refused
                    await self.redis.set(DATASET_KEY, secrets.token_hex(8), nx=True)
                value = await self.redis.get(DATASET_KEY)
                self.dataset = value.decode() if isinstance(value, bytes) else value
            except Exception as exc:  # Redis down: read again next time
                log.debug("redis dataset id not read: %s", type(exc).__name__)
        return self.dataset

    def register(self, kind: str, executor: Executor) -> None:
        """How to do a `kind` of deletion (again): `executor(user_id, arg)`, idempotent."""
        self._executors[kind] = executor

    def _fail(self, reason: str) -> None:
        reason = reason.split("\n")[0][:200]
        if not self.failing:
            log.error("no session is accepted until Redis takes writes and the refused "
                      "deletions are done: %s", reason)
        self.failing = True
        self.reason = reason

    async def refused(self, exc: BaseException, deletion: Deletion | None = None) -> None:
        """Redis refused a write (`exc`); `deletion`, if given, is kept until it is done."""
        self._fail(str(exc))
        if deletion is not None and not await self._journal(deletion):
            self._memory.append(deletion)

    def check(self) -> None:
        """On every token check: one attribute read, no I/O."""
        if self.failing and not _ENDING_SESSIONS.get():
            raise WritesRefused(self.reason)

    # --- the background loop ----------------------------------------------------------

    async def start(self) -> None:
        """At start-up: the refused deletions left by any instance are done (if Redis takes
        writes) before the first request; then the loop runs."""
        await self._dataset()
        await self.probe()
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name="tessera-write-gate")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.PROBE_SECONDS)
            try:
                await self.probe()
            except Exception:  # pragma: no cover - probe catches what it expects
                log.exception("redis write probe failed")

    async def probe(self) -> bool:
        """One probe write; if Redis takes it, the refused deletions are done. True if
        sessions are accepted now."""
        try:
            problem = await write_problem(self.redis)
        except Exception as exc:  # Redis down: the token checks fail on their own (503)
            log.debug("redis write probe failed: %s", type(exc).__name__)
            return False
        if problem is not None:
            self._fail(problem)
            return False
        return await self.replay()

    async def replay(self) -> bool:
        """Do the refused deletions (this process's, then every instance's from the
        database), oldest first; accept sessions again once none is left. True if so."""
        async with self._lock:
            try:
                while self._memory:
                    await self._do(self._memory[0])
                    self._memory.pop(0)
                while rows := await self._pending():
                    self._fail("refused deletions are not done yet")
                    for row_id, deletion in rows:
                        await self._do(deletion)
                        await self._purge(row_id)
            except Exception as exc:
                if is_write_refusal(exc):
                    self._fail(str(exc))
                elif self.failing:  # the database is down: stay closed
                    log.warning("refused deletions not done yet: %s", type(exc).__name__)
                else:
                    log.debug("pending deletions not read: %s", type(exc).__name__)
                return not self.failing
            if self.failing:
                self.failing = False
                log.warning("Redis takes writes again and the refused deletions are done; "
                            "sessions are accepted again")
            return True

    async def _do(self, deletion: Deletion) -> None:
        executor = self._executors.get(deletion.kind)
        if executor is None:
            log.error("a refused deletion of unknown kind %r is dropped", deletion.kind)
            return
        await executor(deletion.user_id, deletion.arg)

    # --- the database's copy ----------------------------------------------------------

    async def _journal(self, deletion: Deletion) -> bool:
        if self.db_factory is None:
            return False
        from tessera.stores.models import PendingDeletion

        try:
            async with asyncio.timeout(self.JOURNAL_TIMEOUT_SECONDS):
                dataset = await self._dataset() or ""
            async with asyncio.timeout(self.JOURNAL_TIMEOUT_SECONDS), self.db_factory() as db:
                db.add(PendingDeletion(kind=deletion.kind, user_id=deletion.user_id,
                                       arg=deletion.arg, redis=dataset))
                await db.commit()
            return True
        except Exception as exc:
            log.error("a refused deletion could not be written to the database; only this "
                      "process keeps it (lost if it stops): %s", type(exc).__name__)
            return False

    async def _pending(self) -> list[tuple[int, Deletion]]:
        if self.db_factory is None:
            return []
        from sqlmodel import col, or_, select

        from tessera.stores.models import PendingDeletion

        query = select(PendingDeletion)
        dataset = await self._dataset()
        if dataset is not None:  # else every row: doing another Redis's deletion is harmless
            query = query.where(or_(col(PendingDeletion.redis) == dataset,
                                    col(PendingDeletion.redis) == ""))
        async with self.db_factory() as db:
            rows = (await db.exec(query.order_by(col(PendingDeletion.id))
                                  .limit(self.BATCH))).all()
        return [(int(r.id), Deletion(r.kind, r.user_id, r.arg)) for r in rows
                if r.id is not None]

    async def _purge(self, row_id: int) -> None:
        assert self.db_factory is not None
        from sqlmodel import col, delete

        from tessera.stores.models import PendingDeletion

        async with self.db_factory() as db:
            await db.exec(delete(PendingDeletion).where(col(PendingDeletion.id) == row_id))
            await db.commit()
