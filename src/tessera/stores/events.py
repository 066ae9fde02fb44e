"""Events for the services around tessera: webhook subscriptions, the event outbox, one
delivery per subscription and event, the mailing vendor's outbox and the disclosure record.

The outboxes are written in the transaction of the change they announce (domain/events.py
`emit`, `queue_vendor`); a worker on any instance claims due rows with a lease (a
conditional UPDATE on `claimed_until`), so two instances never send one row at once and a
dead instance's lease runs out and the row is sent again (at least once).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult
from sqlmodel import Field, SQLModel, col, or_, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.stores.models import new_id, utcnow


def _ts(**kw: Any) -> Any:
    return Field(sa_type=sa.DateTime(timezone=True), **kw)


class WebhookSubscription(SQLModel, table=True):
    __tablename__ = "webhook_subscriptions"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    url: str = Field(max_length=2048)
    events: str = Field(sa_type=sa.Text)  # JSON list of event names, or ["*"]
    # AES-GCM under a key derived from TESSERA_SECRET_KEY (the secret is needed to sign).
    secret_enc: str = Field(max_length=512)
    description: str | None = Field(default=None, max_length=500)
    created_at: datetime = _ts(default_factory=utcnow)


class OutboxEvent(SQLModel, table=True):
    """One event, as `emit` wrote it; fanned out to the subscriptions by the worker."""

    __tablename__ = "event_outbox"

    id: str = Field(default_factory=lambda: "evt_" + new_id(), primary_key=True, max_length=40)
    type: str = Field(max_length=64)
    data: str = Field(sa_type=sa.Text)  # JSON, ids only
    # The user it is about: a deleted account's earlier events are dropped (P9).
    user_id: str | None = Field(default=None, max_length=32, index=True)
    created_at: datetime = _ts(default_factory=utcnow, index=True)
    fanned_out: bool = Field(default=False, index=True)


class WebhookDelivery(SQLModel, table=True):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (sa.UniqueConstraint("subscription_id", "event_id"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    subscription_id: str = Field(foreign_key="webhook_subscriptions.id", index=True,
                                 max_length=32, ondelete="CASCADE")
    event_id: str = Field(foreign_key="event_outbox.id", index=True, max_length=40,
                          ondelete="CASCADE")
    type: str = Field(max_length=64)
    status: str = Field(default="pending", max_length=16, index=True)  # pending delivered failed
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=200)
    created_at: datetime = _ts(default_factory=utcnow)
    next_attempt_at: datetime = _ts(default_factory=utcnow, index=True)
    claimed_until: datetime | None = _ts(default=None)
    claimed_by: str | None = Field(default=None, max_length=32)
    delivered_at: datetime | None = _ts(default=None)


class VendorMessage(SQLModel, table=True):
    """A message for the mailing vendor (P8). It holds the email until it is delivered, then
    it is deleted (and a `Disclosure` kept while the account exists). Per user, strictly in
    order: a delete never overtakes the upsert before it."""

    __tablename__ = "vendor_outbox"

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(max_length=32, index=True)  # no foreign key: outlives the account
    type: str = Field(max_length=32)  # vendor.contact_upsert | vendor.contact_delete
    email: str = Field(max_length=320)
    created_at: datetime = _ts(default_factory=utcnow)
    attempts: int = 0
    last_status_code: int | None = None
    next_attempt_at: datetime = _ts(default_factory=utcnow, index=True)
    claimed_until: datetime | None = _ts(default=None)
    claimed_by: str | None = Field(default=None, max_length=32)


class Disclosure(SQLModel, table=True):
    """Personal data sent out of tessera (the export's `disclosures`); deleted with the
    account."""

    __tablename__ = "disclosures"

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=32, ondelete="CASCADE")
    at: datetime = _ts(default_factory=utcnow)
    recipient: str = Field(max_length=64)
    fields: str = Field(max_length=500)  # JSON list of field names
    purpose: str | None = Field(default=None, max_length=64)


def _free(claimed_until: Any, now: datetime) -> Any:
    return or_(col(claimed_until).is_(None), col(claimed_until) < now)


async def claim(db: AsyncSession, table: Any, row_id: Any, *, now: datetime, until: datetime,
                worker: str) -> bool:
    """Take the lease on one row: true only for the one caller whose UPDATE matched."""
    result: CursorResult[Any] = await db.exec(
        update(table).where(col(table.id) == row_id, _free(table.claimed_until, now))
        .values(claimed_until=until, claimed_by=worker))
    return bool(result.rowcount == 1)


async def due_deliveries(db: AsyncSession, now: datetime, limit: int) -> list[str]:
    rows = await db.exec(
        select(WebhookDelivery.id).where(
            WebhookDelivery.status == "pending", col(WebhookDelivery.next_attempt_at) <= now,
            _free(WebhookDelivery.claimed_until, now))
        .order_by(col(WebhookDelivery.next_attempt_at), col(WebhookDelivery.id)).limit(limit))
    return list(rows.all())


async def due_vendor_messages(db: AsyncSession, now: datetime, limit: int) -> list[int]:
    """The oldest message of each user, when it is due and free."""
    older = sa.orm.aliased(VendorMessage)
    rows = await db.exec(
        select(VendorMessage.id).where(
            col(VendorMessage.next_attempt_at) <= now, _free(VendorMessage.claimed_until, now),
            ~sa.exists().where(col(older.user_id) == col(VendorMessage.user_id),
                               col(older.id) < col(VendorMessage.id)))
        .order_by(col(VendorMessage.id)).limit(limit))
    return [row for row in rows.all() if row is not None]
