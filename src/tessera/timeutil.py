"""RFC 3339 UTC times. SQLite hands datetimes back naive: they were written as UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def rfc3339(value: datetime) -> str:
    return as_utc(value).isoformat(timespec="seconds").replace("+00:00", "Z")


def from_epoch(seconds: int | float) -> str:
    return rfc3339(datetime.fromtimestamp(seconds, UTC))
