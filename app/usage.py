"""Usage log (P4): events buffered in memory and written in batches off the request path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.models import UsageEvent, User, utcnow

log = logging.getLogger("tessera.usage")

# Past this many unwritten events (the database being down for long) the oldest are dropped.
MAX_BUFFERED = 200_000


def _clean(value: str, limit: int) -> str:
    """Control characters (NUL above all) are not stored: PostgreSQL refuses NUL in text."""
    value = value[:limit]
    if value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in value)


# An event as buffered and written: the columns of `usage_events` in this order.
Event = tuple[str, datetime, str | None, str, str, str | None, int, int]
COLUMNS = ("user_id", "at", "ip", "method", "path", "host", "status", "bytes")


class UsageRecorder:
    def __init__(self, engine: AsyncEngine, *, flush_events: int, flush_seconds: float) -> None:
        self._engine = engine
        self._flush_events = flush_events
        self._flush_seconds = flush_seconds
        self._buffer: list[Event] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._sql, self._binders = _insert_statement(engine.dialect)

    def record(self, *, user_id: str, at: datetime, ip: str | None, method: str, path: str,
               host: str | None, status: int, nbytes: int) -> None:
        """Called on the request path: appends to memory only."""
        self._buffer.append((user_id, at, ip, method[:16], _clean(path, 512),
                             _clean(host, 255) if host else None, status, nbytes))
        if len(self._buffer) >= self._flush_events:
            self._wake.set()

    def forget(self, user_id: str) -> None:
        """Drop unwritten events of a user whose account is being deleted."""
        self._buffer = [e for e in self._buffer if e[0] != user_id]

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

    async def _insert(self, batch: list[Event]) -> None:
        # One executemany on the driver: the ORM's per-row work (unit of work, parameter
        # construction) cost more than the database's own (docs/performance.md).
        binders = self._binders
        rows = [tuple(v if bind is None or v is None else bind(v)
                      for v, bind in zip(event, binders, strict=True)) for event in batch]
        async with self._engine.begin() as conn:
            await conn.exec_driver_sql(self._sql, rows)

    async def _insert_each(self, batch: list[Event]) -> None:
        for event in batch:
            try:
                await self._insert([event])
            except (OperationalError, InterfaceError, OSError):
                raise
            except DBAPIError:
                log.warning("usage event refused by the database and dropped")

    async def _only_existing_users(self, batch: list[Event]) -> list[Event]:
        ids = {e[0] for e in batch}
        async with AsyncSession(self._engine) as db:
            alive = set((await db.exec(select(User.id).where(col(User.id).in_(ids)))).all())
        return [e for e in batch if e[0] in alive]


def _insert_statement(dialect: Dialect) -> tuple[str, list[Callable[[Any], Any] | None]]:
    """The INSERT compiled for this driver (its own placeholders), and each column's bind
    processor (how SQLAlchemy converts a value for it, e.g. a datetime for SQLite)."""
    table = UsageEvent.__table__  # type: ignore[attr-defined]
    compiled = table.insert().values({name: sa.bindparam(name) for name in COLUMNS}).compile(
        dialect=dialect, for_executemany=True)
    if not compiled.positional or tuple(compiled.positiontup or ()) != COLUMNS:
        raise RuntimeError(f"unsupported DB-API paramstyle {dialect.paramstyle!r}")
    binders = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
               for name in COLUMNS]
    return str(compiled), binders


async def purge_usage(db: AsyncSession, retention_days: int) -> int:
    """Delete usage events older than the retention (0 deletes them all)."""
    cutoff = utcnow() - timedelta(days=retention_days)
    result = await db.exec(delete(UsageEvent).where(col(UsageEvent.at) <= cutoff))
    await db.commit()
    return int(result.rowcount or 0)
