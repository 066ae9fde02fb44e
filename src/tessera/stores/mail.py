"""Mail tables: the durable outbox and the one-time tokens mails carry (stored hashed).

The outbox is drained by `tessera.domain.mail.MailWorker`; a batch of rows is claimed with
one conditional UPDATE (`claimed_until`), so two instances never send the same row at once,
and marked sent with one or two statements and one commit.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel, col, delete, func, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.stores.models import _ts, utcnow

QUEUED, SENT, FAILED = "queued", "sent", "failed"
TOKEN_PURPOSES = ("verify", "reset", "email_change")


class OutboxMail(SQLModel, table=True):
    """One mail to send. `user_id` is NULL for mails not tied to a live account (the
    account-deleted notice, `tessera mail test`): such rows are deleted once sent."""

    __tablename__ = "mail_outbox"

    id: int | None = Field(default=None, primary_key=True)
    user_id: str | None = Field(default=None, foreign_key="users.id", index=True,
                                max_length=32, ondelete="CASCADE")
    to_addr: str = Field(max_length=320)
    kind: str = Field(max_length=32)
    subject: str = Field(max_length=998)
    # Emptied once the mail is sent: a token must not outlive its delivery in the outbox.
    text_body: str = Field(sa_type=sa.Text)
    html_body: str = Field(sa_type=sa.Text)
    status: str = Field(default=QUEUED, max_length=16, index=True)
    attempts: int = 0
    created_at: datetime = _ts(default_factory=utcnow)
    next_attempt_at: datetime = _ts(default_factory=utcnow, index=True)
    claimed_until: datetime | None = _ts(default=None)
    sent_at: datetime | None = _ts(default=None)
    # The exception type of the last failed attempt (never the message: it may quote input).
    last_error: str | None = Field(default=None, max_length=128)


class MailToken(SQLModel, table=True):
    """A one-time token sent by mail: only its SHA-256 is stored. `email` is the address the
    token was sent to (the new address for `email_change`)."""

    __tablename__ = "mail_tokens"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    purpose: str = Field(max_length=16)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=32, ondelete="CASCADE")
    email: str = Field(max_length=320)
    created_at: datetime = _ts(default_factory=utcnow)
    expires_at: datetime = _ts()
    used_at: datetime | None = _ts(default=None)


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits: a plain SHA-256 is enough (no guessing to slow down).
    return hashlib.sha256(token.encode()).hexdigest()


def as_aware(value: datetime) -> datetime:
    """SQLite hands datetimes back naive: they were written as UTC."""
    from datetime import UTC

    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


# --- tokens --------------------------------------------------------------------------------

def add_token(db: AsyncSession, *, token: str, purpose: str, user_id: str, email: str,
              ttl_seconds: int) -> MailToken:
    now = utcnow()
    row = MailToken(token_hash=hash_token(token), purpose=purpose, user_id=user_id,
                    email=email, created_at=now, expires_at=now + timedelta(seconds=ttl_seconds))
    db.add(row)
    return row


async def find_token(db: AsyncSession, token: str, purpose: str) -> MailToken | None:
    """The live (unused, unexpired) token of this purpose, or None."""
    if not token or len(token) > 512:
        return None
    row = (await db.exec(select(MailToken).where(MailToken.token_hash == hash_token(token),
                                                 MailToken.purpose == purpose))).first()
    if row is None or row.used_at is not None or as_aware(row.expires_at) <= utcnow():
        return None
    return row


async def use_token(db: AsyncSession, row: MailToken) -> bool:
    """Mark the token used, atomically: False if another request used it first."""
    assert row.id is not None
    result = await db.exec(
        update(MailToken)
        .where(col(MailToken.id) == row.id, col(MailToken.used_at).is_(None),
               col(MailToken.expires_at) > utcnow())
        .values(used_at=utcnow()).execution_options(synchronize_session=False))
    return bool(result.rowcount == 1)


async def end_tokens(db: AsyncSession, user_id: str, purpose: str) -> None:
    """Every outstanding token of this purpose for the user stops working."""
    await db.exec(update(MailToken)
                  .where(col(MailToken.user_id) == user_id, col(MailToken.purpose) == purpose,
                         col(MailToken.used_at).is_(None))
                  .values(used_at=utcnow()).execution_options(synchronize_session=False))


# --- outbox --------------------------------------------------------------------------------

async def claim(db: AsyncSession, lease_seconds: float, limit: int) -> list[OutboxMail]:
    """Up to `limit` rows due now, claimed by one conditional UPDATE ... RETURNING and one
    commit: a row another instance claimed first (its lease not yet over) is skipped (on
    PostgreSQL the condition is checked again on a row another claim just updated)."""
    now = utcnow()
    claimable = (col(OutboxMail.status) == QUEUED,
                 sa.or_(col(OutboxMail.claimed_until).is_(None),
                        col(OutboxMail.claimed_until) < now))
    due = (select(OutboxMail.id)
           .where(col(OutboxMail.next_attempt_at) <= now, *claimable)
           .order_by(col(OutboxMail.next_attempt_at), col(OutboxMail.id)).limit(limit))
    result = await db.exec(
        update(OutboxMail)
        .where(col(OutboxMail.id).in_(due.scalar_subquery()), *claimable)
        .values(claimed_until=now + timedelta(seconds=lease_seconds))
        .returning(OutboxMail).execution_options(synchronize_session=False))
    rows = list(result.scalars().all())
    await db.commit()
    return sorted(rows, key=lambda row: (as_aware(row.next_attempt_at), row.id or 0))


def record_sent(mails: list[OutboxMail]) -> list[Any]:
    """The statements that mark `mails` sent (two at most, whatever their number): rows of
    no account are deleted, the others keep their metadata with their bodies emptied."""
    gone = [m.id for m in mails if m.user_id is None]
    kept = [m.id for m in mails if m.user_id is not None]
    statements: list[Any] = []
    if gone:
        statements.append(delete(OutboxMail).where(col(OutboxMail.id).in_(gone)))
    if kept:
        statements.append(update(OutboxMail).where(col(OutboxMail.id).in_(kept)).values(
            status=SENT, sent_at=utcnow(), claimed_until=None, text_body="", html_body="",
            attempts=col(OutboxMail.attempts) + 1, last_error=None)
            .execution_options(synchronize_session=False))
    return statements


def record_failed(mail: OutboxMail, error: str, *, retry_at: datetime | None) -> Any:
    """A failed attempt: retried at `retry_at`, or given up (None)."""
    values: dict[str, object] = {"attempts": mail.attempts + 1, "claimed_until": None,
                                 "last_error": error[:128]}
    if retry_at is None:
        values.update(status=FAILED, text_body="", html_body="")
    else:
        values["next_attempt_at"] = retry_at
    return (update(OutboxMail).where(col(OutboxMail.id) == mail.id).values(**values)
            .execution_options(synchronize_session=False))


async def mark_sent(db: AsyncSession, mail: OutboxMail) -> None:
    for statement in record_sent([mail]):
        await db.exec(statement)
    await db.commit()


async def mark_failed(db: AsyncSession, mail: OutboxMail, error: str, *, retry_at: datetime | None
                      ) -> None:
    await db.exec(record_failed(mail, error, retry_at=retry_at))
    await db.commit()


async def queue_stats(db: AsyncSession) -> tuple[int, datetime | None]:
    """How many mails wait, and since when the oldest one."""
    count, oldest = (await db.exec(
        select(func.count(), func.min(OutboxMail.created_at))
        .where(OutboxMail.status == QUEUED))).one()
    return int(count), as_aware(oldest) if oldest is not None else None


async def mails_of(db: AsyncSession, user_id: str) -> list[OutboxMail]:
    return list((await db.exec(select(OutboxMail).where(OutboxMail.user_id == user_id)
                               .order_by(col(OutboxMail.created_at), col(OutboxMail.id)))).all())


async def erase_mail_rows(db: AsyncSession, user_id: str) -> None:
    """P9: the user's outbox rows and tokens go with the account."""
    for table in (OutboxMail, MailToken):
        await db.exec(delete(table).where(col(table.user_id) == user_id))


async def purge_mail(db: AsyncSession, retention_days: int) -> int:
    """Sent and given-up mails past retention, and tokens used or expired (worthless)."""
    cutoff = utcnow() - timedelta(days=retention_days)
    mails = await db.exec(delete(OutboxMail).where(
        col(OutboxMail.status) != QUEUED,
        sa.func.coalesce(col(OutboxMail.sent_at), col(OutboxMail.next_attempt_at)) < cutoff))
    tokens = await db.exec(delete(MailToken).where(
        sa.or_(col(MailToken.expires_at) < utcnow(), col(MailToken.used_at).is_not(None))))
    await db.commit()
    return int(mails.rowcount or 0) + int(tokens.rowcount or 0)
