"""SQLModel tables. Times are timezone-aware UTC; ids are opaque strings."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return secrets.token_hex(16)


def _ts(**kw: Any) -> Any:
    return Field(sa_type=sa.DateTime(timezone=True), **kw)


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    # Shown as the user typed it; `email_key` (casefolded) carries the uniqueness.
    # Both are NULL once a minor's personal data has been erased (P7).
    email: str | None = Field(default=None, max_length=320)
    email_key: str | None = Field(default=None, max_length=320, unique=True, index=True)
    password_hash: str | None = Field(default=None, max_length=255)
    is_active: bool = True
    is_admin: bool = False
    created_at: datetime = _ts(default_factory=utcnow)
    updated_at: datetime = _ts(default_factory=utcnow)
    policy_version: str | None = Field(default=None, max_length=64)
    policy_seq: int = 0
    policy_accepted_at: datetime | None = _ts(default=None)
    restrict_processing: bool = False
    object_to_processing: bool = False
    deactivated_at: datetime | None = _ts(default=None)
    # Mail (issue 13): the address was confirmed by a token sent to it; an address waiting
    # for its confirmation mail (PATCH /me) is `pending_email`.
    email_verified: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    pending_email: str | None = Field(default=None, max_length=320)


class PolicyVersion(SQLModel, table=True):
    __tablename__ = "policy_versions"

    seq: int | None = Field(default=None, primary_key=True)
    version: str = Field(max_length=64, unique=True)
    substantial: bool = False
    published_at: datetime = _ts(default_factory=utcnow)


class SigningKey(SQLModel, table=True):
    __tablename__ = "signing_keys"

    kid: str = Field(primary_key=True, max_length=64)
    public_x: str = Field(max_length=64)  # base64url raw Ed25519 public key
    private_enc: str = Field(max_length=512)  # AES-GCM under a key derived from the secret
    created_at: datetime = _ts(default_factory=utcnow)
    retired_at: datetime | None = _ts(default=None)
    # Published until this moment: the last token it may have signed has expired by then.
    publish_until: datetime | None = _ts(default=None)


class ConsentEvent(SQLModel, table=True):
    """Every grant and withdrawal, kept so the export shows the history (P8)."""

    __tablename__ = "consent_events"

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=32, ondelete="CASCADE")
    purpose: str = Field(max_length=32)
    granted: bool
    at: datetime = _ts(default_factory=utcnow)


class PrivacyRequest(SQLModel, table=True):
    __tablename__ = "privacy_requests"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=32, ondelete="CASCADE")
    kind: str = Field(max_length=32)
    region: str = Field(max_length=2)
    message: str | None = Field(default=None, max_length=2000)
    status: str = Field(default="open", max_length=16, index=True)
    created_at: datetime = _ts(default_factory=utcnow)
    due_at: datetime = _ts(index=True)
    resolved_at: datetime | None = _ts(default=None)
    resolution: str | None = Field(default=None, max_length=2000)


class UsageSegment(SQLModel, table=True):
    """One user's usage events (P4) written together: one row per user per flush of the log,
    the events as a JSON array of `[at (microseconds since the epoch), ip, method, path,
    host, status, bytes]`, one per request by a user for whom tracking is allowed. Written
    at the request rate, this costs one row per user and flush rather than one per request
    (docs/performance.md)."""

    __tablename__ = "usage_segments"

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=32, ondelete="CASCADE")
    first_at: datetime = _ts(index=True)
    last_at: datetime = _ts(index=True)
    count: int
    events: str = Field(sa_type=sa.Text)


class AuditEvent(SQLModel, table=True):
    """Security events: who did what, by user id (never the email)."""

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _ts(default_factory=utcnow, index=True)
    event: str = Field(max_length=64)
    user_id: str | None = Field(default=None, max_length=32, index=True)
    actor_id: str | None = Field(default=None, max_length=32)
    outcome: str | None = Field(default=None, max_length=32)
    detail: str | None = Field(default=None, max_length=512)


class PendingDeletion(SQLModel, table=True):
    """A session deletion Redis refused (MISCONF on a full disk, READONLY, OOM), kept here
    so that no instance accepts the session and whichever instance finds Redis writable
    again does it, then deletes the row (stores/durability.py:WriteGate). Ids only.

    `kind`: "session" (`arg` the sid), "sessions" (every session of the user, `arg` the sid
    kept, if any), "profile" (the user's cached profile)."""

    __tablename__ = "pending_deletions"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)
    user_id: str = Field(max_length=32)
    arg: str | None = Field(default=None, max_length=64)
    # The Redis data set it was refused by (its `tessera:dataset` key; "" if unknown): done
    # only by instances on that Redis.
    redis: str = Field(default="", max_length=32)
    created_at: datetime = _ts(default_factory=utcnow)


# Tables of the features, registered with this metadata (Alembic reads it from here).
from tessera.stores import events, mail, mfa  # noqa: E402,F401,I001
