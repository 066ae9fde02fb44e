"""Usage log (P4): events buffered in memory and written in batches off the request path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.models import UsageEvent, User, utcnow

log = logging.getLogger("tessera.usage")

# Past this many unwritten events (the database being down for long) the oldest are dropped.
MAX_BUFFERED = 200_000


def _clean(value: str, limit: int) -> str:
    """Control characters (NUL above all) are not stored: PostgreSQL refuses NUL in text."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in value[:limit])


class UsageRecorder:
    def __init__(self, factory: async_sessionmaker[AsyncSession], *, flush_events: int,
                 flush_seconds: float) -> None:
        self._factory = factory
        self._flush_events = flush_events
        self._flush_seconds = flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def record(self, *, user_id: str, at: datetime, ip: str | None, method: str, path: str,
               host: str | None, status: int, nbytes: int) -> None:
        """Called on the request path: appends to memory only."""
        self._buffer.append({"user_id": user_id, "at": at, "ip": ip, "method": method[:16],
                             "path": _clean(path, 512), "host": _clean(host, 255) if host else None,
                             "status": status, "bytes": nbytes})
        if len(self._buffer) >= self._flush_events:
            self._wake.set()

    def forget(self, user_id: str) -> None:
        """Drop unwritten events of a user whose account is being deleted."""
        self._buffer = [e for e in self._buffer if e["user_id"] != user_id]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tessera-usage-flusher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_seconds)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # the database may be down: keep the events and retry
                log.warning("usage flush failed; %d events kept for retry", len(self._buffer))

    async def flush(self) -> int:
        async with self._lock:
            batch, self._buffer = self._buffer, []
            if not batch:
                return 0
            try:
                await self._insert(batch)
            except IntegrityError:
                # A user was deleted meanwhile (perhaps on another instance): drop their events.
                batch = await self._only_existing_users(batch)
                if batch:
                    await self._insert_each(batch)
            except (OperationalError, InterfaceError, OSError):
                # The database is unreachable: keep everything for the next try.
                self._buffer = (batch + self._buffer)[-MAX_BUFFERED:]
                raise
            except DBAPIError:
                # Some row the database refuses: write the others, never block the log on one.
                await self._insert_each(batch)
            return len(batch)

    async def _insert(self, batch: list[dict[str, Any]]) -> None:
        async with self._factory() as db:
            await db.exec(sa.insert(UsageEvent), params=batch)
            await db.commit()

    async def _insert_each(self, batch: list[dict[str, Any]]) -> None:
        for event in batch:
            try:
                await self._insert([event])
            except (OperationalError, InterfaceError, OSError):
                raise
            except DBAPIError:
                log.warning("usage event refused by the database and dropped")

    async def _only_existing_users(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ids = {e["user_id"] for e in batch}
        async with self._factory() as db:
            alive = set((await db.exec(select(User.id).where(col(User.id).in_(ids)))).all())
        return [e for e in batch if e["user_id"] in alive]


async def purge_usage(db: AsyncSession, retention_days: int) -> int:
    """Delete usage events older than the retention (0 deletes them all)."""
    cutoff = utcnow() - timedelta(days=retention_days)
    result = await db.exec(delete(UsageEvent).where(col(UsageEvent.at) <= cutoff))
    await db.commit()
    return int(result.rowcount or 0)
