"""Audit events that need no transaction of their own (a logout, a logout-all), buffered and
written in batches off the request path, as the usage log is: on SQLite, a commit per
logout would put the single writer on every logout's critical path.

Events of changes that commit anyway (a password change, a deletion) are written in that
change's own transaction instead (`domain/accounts.py` `audit`). A clean stop writes what
is buffered; a crash (kill -9) may lose the last flush interval's events (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.stores.models import AuditEvent, utcnow

log = logging.getLogger("tessera.audit")

MAX_BUFFERED = 100_000


class AuditTrail:
    def __init__(self, factory: async_sessionmaker[AsyncSession], *,
                 flush_seconds: float) -> None:
        self._factory = factory
        self._flush_seconds = flush_seconds
        self._buffer: list[dict[str, object]] = []
        # Rows that go with the buffered events, written in the same transaction (e.g. the
        # outbox row of a `session.revoked` webhook event).
        self._with: list[Callable[[AsyncSession], None]] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def record(self, event: str, *, user_id: str | None, outcome: str | None = None,
               at: datetime | None = None,
               also: Callable[[AsyncSession], None] | None = None) -> None:
        """On the request path: memory only (ids, never an email or token). `also` adds the
        rows that belong with this event to the flush's unit of work."""
        self._buffer.append({"event": event, "user_id": user_id, "actor_id": None,
                             "outcome": outcome, "detail": None, "at": at or utcnow()})
        if also is not None:
            self._with.append(also)
        if len(self._buffer) > MAX_BUFFERED:
            del self._buffer[: len(self._buffer) - MAX_BUFFERED]

    async def flush(self) -> int:
        async with self._lock:
            batch, self._buffer = self._buffer, []
            extra, self._with = self._with, []
            if not batch:
                return 0
            try:
                async with self._factory() as db:
                    await db.exec(AuditEvent.__table__.insert(), params=batch)  # type: ignore[attr-defined]
                    for add in extra:
                        add(db)
                    await db.commit()
            except (OperationalError, InterfaceError, OSError):
                self._buffer = (batch + self._buffer)[-MAX_BUFFERED:]  # retried next flush
                self._with = extra + self._with
                raise
            return len(batch)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tessera-audit-flusher")

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_seconds)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # the database may be down: keep the events and retry
                log.warning("audit flush failed; %d events kept for retry", len(self._buffer))

    @property
    def pending(self) -> int:
        """Events not written yet."""
        return len(self._buffer)

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()
