"""Usage log (P4): events buffered in memory and written in batches off the request path.

An event is `(user_id, at, ip, method, path, host, status, bytes)`. A flush writes one
`UsageSegment` row per user holding that user's events as JSON (see app/models.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.stores.db import is_unavailable
from tessera.stores.models import UsageSegment, User, utcnow
from tessera.timeutil import as_utc, rfc3339

log = logging.getLogger("tessera.usage")

# Past this many unwritten events (the database being down for long) the oldest are dropped.
MAX_BUFFERED = 200_000
# Events of a forgotten (deleted, erased) user are not recorded for this long afterwards.
FORGET_SECONDS = 300.0
STOP_TIMEOUT_SECONDS = 10.0

# An event as buffered: (user_id, at, ip, method, path, host, status, bytes), `at` in whole
# microseconds since the epoch (an integer encodes faster than a float's repr).
Event = tuple[str, int, str | None, str, str, str | None, int, int]
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def _clean(value: str, limit: int) -> str:
    """Control characters (NUL above all) are not stored: PostgreSQL refuses NUL in text."""
    value = value[:limit]
    if value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in value)


def _at(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def micros_since_epoch(value: datetime) -> int:
    return (as_utc(value) - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def segments_of(batch: list[Event]) -> list[dict[str, Any]]:
    """The rows one flush writes: per user, their events in order."""
    by_user: dict[str, list[Event]] = {}
    for event in batch:
        by_user.setdefault(event[0], []).append(event)
    segments = []
    for user_id, events in by_user.items():
        ats = [e[1] for e in events]
        segments.append({"user_id": user_id, "first_at": _at(min(ats)), "last_at": _at(max(ats)),
                         "count": len(events), "events": _ENCODER.encode([e[1:] for e in events])})
    return segments


def event_view(event: list[Any]) -> dict[str, Any]:
    """An event as the export shows it (API.md: `{at, ip, method, path, host, status, bytes}`)."""
    at, ip, method, path, host, status, nbytes = event
    return {"at": rfc3339(_at(at)), "ip": ip, "method": method, "path": path, "host": host,
            "status": status, "bytes": nbytes}


async def usage_log_of(db: AsyncSession, user_id: str) -> list[dict[str, Any]]:
    """The user's usage events, oldest first."""
    segments = (await db.exec(select(UsageSegment).where(UsageSegment.user_id == user_id)
                              .order_by(col(UsageSegment.first_at), col(UsageSegment.id)))).all()
    events = [event for segment in segments for event in json.loads(segment.events)]
    events.sort(key=lambda event: event[0])  # stable: several instances' segments interleave
    return [event_view(event) for event in events]


class UsageRecorder:
    def __init__(self, factory: async_sessionmaker[AsyncSession], *, flush_events: int,
                 flush_seconds: float) -> None:
        self._factory = factory
        self._flush_events = flush_events
        self._flush_seconds = flush_seconds
        self._buffer: list[Event] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._forgotten: dict[str, float] = {}  # user id -> when forgotten (monotonic)
        self._stopping = False
        self.accepted = 0  # events taken by record(), for the fault tests' bookkeeping

    def record(self, *, user_id: str, ip: str | None, method: str, path: str,
               host: str | None, status: int, nbytes: int) -> None:
        """Called on the request path: appends to memory only."""
        if user_id in self._forgotten:
            return
        self.accepted += 1
        self._buffer.append((user_id, time.time_ns() // 1000, ip, method[:16], _clean(path, 512),
                             _clean(host, 255) if host else None, status, nbytes))
        if len(self._buffer) >= self._flush_events:
            self._wake.set()

    async def forget(self, user_id: str) -> None:
        """Drop unwritten events of a user whose account is being deleted or erased, wait for
        a flush in flight (it may carry theirs), and record none of theirs for a while (a
        request of theirs still being served): call it before deleting their stored log."""
        now = time.monotonic()
        self._forgotten = {u: at for u, at in self._forgotten.items()
                           if now - at < FORGET_SECONDS}
        self._forgotten[user_id] = now
        async with self._lock:  # a flush in flight writes before the caller deletes
            self._buffer = [e for e in self._buffer if e[0] != user_id]

    @property
    def pending(self) -> int:
        """Events not written yet."""
        return len(self._buffer)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tessera-usage-flusher")

    async def stop(self) -> None:
        """The flusher ends after its current flush (never cancelled mid-write, which would
        lose its batch); then whatever is left is written."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT_SECONDS)
            except Exception:  # stuck on a dead database: give up on it
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while not self._stopping:
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
            if self._forgotten:
                batch = [e for e in batch if e[0] not in self._forgotten]
            if not batch:
                return 0
            segments = segments_of(batch)
            written: set[str] = set()  # users whose segment is committed
            try:
                try:
                    await self._insert(segments)
                    return len(batch)
                except Exception as exc:
                    if is_unavailable(exc):
                        raise
                    if isinstance(exc, IntegrityError):
                        # A user was deleted meanwhile (perhaps on another instance): drop
                        # their events.
                        segments = await self._only_existing_users(segments)
                    elif not isinstance(exc, DBAPIError):
                        raise
                # Some row the database refuses: write the others, never block the log on one.
                await self._insert_each(segments, written)
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                # The database is unreachable (down, restarting, partitioned): keep what is
                # not written for the next try.
                kept = [e for e in batch if e[0] not in written]
                self._buffer = (kept + self._buffer)[-MAX_BUFFERED:]
                raise
            return len(batch)

    async def _insert(self, segments: list[dict[str, Any]]) -> None:
        async with self._factory() as db:
            await db.exec(UsageSegment.__table__.insert(), params=segments)  # type: ignore[attr-defined]
            await db.commit()

    async def _insert_each(self, segments: list[dict[str, Any]], written: set[str]) -> None:
        for segment in segments:
            try:
                await self._insert([segment])
            except DBAPIError as exc:
                if is_unavailable(exc):
                    raise
                log.warning("%d usage events refused by the database and dropped",
                            segment["count"])
            written.add(segment["user_id"])

    async def _only_existing_users(self, segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ids = {s["user_id"] for s in segments}
        async with self._factory() as db:
            alive = set((await db.exec(select(User.id).where(col(User.id).in_(ids)))).all())
        return [s for s in segments if s["user_id"] in alive]


async def purge_usage(db: AsyncSession, retention_days: int) -> int:
    """Delete usage events older than the retention (0 deletes them all); returns how many."""
    cutoff = utcnow() - timedelta(days=retention_days)
    whole = (col(UsageSegment.last_at) <= cutoff)
    purged = int((await db.exec(select(func.coalesce(func.sum(UsageSegment.count), 0))
                                .where(whole))).one())
    await db.exec(delete(UsageSegment).where(whole))
    # Segments that straddle the cutoff keep only their newer events.
    limit = micros_since_epoch(cutoff)
    straddling = (await db.exec(select(UsageSegment).where(
        col(UsageSegment.first_at) <= cutoff, col(UsageSegment.last_at) > cutoff))).all()
    for segment in straddling:
        events = json.loads(segment.events)
        kept = [e for e in events if e[0] > limit]
        purged += len(events) - len(kept)
        if not kept:
            await db.delete(segment)
            continue
        segment.events = _ENCODER.encode(kept)
        segment.count = len(kept)
        segment.first_at = _at(min(e[0] for e in kept))
        db.add(segment)
    await db.commit()
    return purged
