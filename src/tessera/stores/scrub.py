"""After an account's personal data is deleted, get it off the disk too (issue 12.7).

SQLite: connections run with `secure_delete=ON` (stores/db.py), so deleted rows are zeroed
in the database file, and `checkpoint_sqlite` moves the WAL (which still holds the pages as
they were) into the file and truncates it.

Redis: deleting a key leaves its value in the last RDB snapshot and in the append-only file
until they are rewritten. `SnapshotScrubber.request()` asks Redis for a new snapshot
(BGSAVE, only if snapshots are configured) and an AOF rewrite (BGREWRITEAOF, only if AOF is
on), after any rewrite already running (it may have started before the deletion). Refusals
(a managed Redis without CONFIG, a rewrite in progress) are logged and ignored: what that
leaves is in docs/security.md. A Redis Cluster is not asked (its nodes rewrite on their own
schedule).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from tessera.stores.redis import AnyRedis

log = logging.getLogger("tessera.scrub")

REWRITE_WAIT_SECONDS = 60.0
POLL_SECONDS = 0.05


async def checkpoint_sqlite(engine: AsyncEngine) -> bool:
    """Copy the WAL into the database file and truncate it; True if it completed (a reader
    in the middle of a transaction makes it busy: retried a few times)."""
    if engine.dialect.name != "sqlite":
        return True
    for _ in range(20):
        async with engine.connect() as conn:
            row = (await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")).first()
        if row is not None and row[0] == 0:
            return True
        await asyncio.sleep(POLL_SECONDS)
    log.warning("the SQLite WAL could not be checkpointed after an erasure; the next "
                "checkpoint will clear it")
    return False


class SnapshotScrubber:
    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def request(self) -> None:
        """Rewrite Redis's files soon (in the background); coalesces with a run in flight."""
        if isinstance(self.redis, RedisCluster):
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def idle(self) -> None:
        """Wait until the requested rewrites are done (tests, shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self._rewrite()
            except (RedisError, OSError) as exc:
                log.warning("could not rewrite the Redis files after an erasure: %s",
                            type(exc).__name__)
            if not self._again:
                return

    async def _persistence(self) -> dict[str, Any]:
        info: dict[str, Any] = await self.redis.info("persistence")
        return info

    async def _wait(self, flag: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REWRITE_WAIT_SECONDS
        while loop.time() < deadline:  # Redis says nothing when it is done: poll
            if not (await self._persistence()).get(flag):
                return
            await asyncio.sleep(POLL_SECONDS)

    async def _snapshots_configured(self, info: dict[str, Any]) -> bool:
        try:
            save = (await self.redis.config_get("save")).get("save", "")
            return bool(str(save).strip())
        except RedisError:  # CONFIG is disabled (managed Redis): snapshots made so far?
            return int(info.get("rdb_saves", 0) or 0) > 0

    async def _rewrite(self) -> None:
        info = await self._persistence()
        if await self._snapshots_configured(info):
            await self._wait("rdb_bgsave_in_progress")  # may have begun before the deletion
            # Redis notes the snapshot's child before it answers, so "in progress" holds from
            # this answer until the new snapshot is written.
            await self.redis.bgsave()
            await self._wait("rdb_bgsave_in_progress")
        if info.get("aof_enabled"):
            await self._wait("aof_rewrite_in_progress")
            await self.redis.bgrewriteaof()
            await self._wait("aof_rewrite_in_progress")
