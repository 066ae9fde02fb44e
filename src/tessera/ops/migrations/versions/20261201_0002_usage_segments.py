"""usage log in segments: one row per user and flush instead of one per request

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Every event of `usage_events` moves into `usage_segments` (per user, in order, at most 1000
events per segment); nothing is dropped. The downgrade moves them back. Stop the instances
running the previous version first: once the old table is gone, the events they still
buffer can no longer be written (on PostgreSQL the table is locked while it is moved).
"""
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENTS_PER_SEGMENT = 1000
PAGE_ROWS = 20000

_events = sa.table(
    "usage_events", sa.column("id", sa.Integer), sa.column("user_id", sa.String),
    sa.column("at", sa.DateTime(timezone=True)), sa.column("ip", sa.String),
    sa.column("method", sa.String), sa.column("path", sa.String), sa.column("host", sa.String),
    sa.column("status", sa.Integer), sa.column("bytes", sa.Integer))
_segments = sa.table(
    "usage_segments", sa.column("user_id", sa.String),
    sa.column("first_at", sa.DateTime(timezone=True)),
    sa.column("last_at", sa.DateTime(timezone=True)), sa.column("count", sa.Integer),
    sa.column("events", sa.Text))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(value: datetime) -> int:
    """Microseconds since the epoch. SQLite hands datetimes back naive: written as UTC."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return (aware - _EPOCH) // timedelta(microseconds=1)


def _at(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _create_events_table() -> None:
    op.create_table('usage_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ip', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('method', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('path', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('status', sa.Integer(), nullable=False),
    sa.Column('bytes', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_usage_events_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_usage_events_user_id'), ['user_id'], unique=False)


def _drop_events_table() -> None:
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usage_events_user_id'))
        batch_op.drop_index(batch_op.f('ix_usage_events_at'))
    op.drop_table('usage_events')


def upgrade() -> None:
    op.create_table('usage_segments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('first_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('events', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('usage_segments', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_usage_segments_first_at'), ['first_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_usage_segments_last_at'), ['last_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_usage_segments_user_id'), ['user_id'], unique=False)

    bind = op.get_bind()
    if bind.dialect.name == "postgresql":  # no instance may add rows while they are moved
        op.execute("LOCK TABLE usage_events IN EXCLUSIVE MODE")
    last_id = 0
    while True:  # in pages by id, so a large log never has to fit in memory at once
        rows = bind.execute(sa.select(_events).where(_events.c.id > last_id)
                            .order_by(_events.c.id).limit(PAGE_ROWS)).all()
        if not rows:
            break
        last_id = rows[-1].id
        by_user: dict[str, list[list[Any]]] = {}
        for r in rows:
            by_user.setdefault(r.user_id, []).append(
                [_micros(r.at), r.ip, r.method, r.path, r.host, r.status, r.bytes])
        segments: list[dict[str, Any]] = []
        for user_id, events in by_user.items():
            events.sort(key=lambda e: e[0])
            for start in range(0, len(events), EVENTS_PER_SEGMENT):
                chunk = events[start:start + EVENTS_PER_SEGMENT]
                segments.append({
                    "user_id": user_id, "count": len(chunk),
                    "first_at": _at(chunk[0][0]), "last_at": _at(chunk[-1][0]),
                    "events": json.dumps(chunk, separators=(",", ":"))})
        op.bulk_insert(_segments, segments)
    _drop_events_table()


def downgrade() -> None:
    _create_events_table()
    bind = op.get_bind()
    rows = bind.execute(sa.select(_segments)).all()
    events = [{"user_id": row.user_id, "at": _at(e[0]), "ip": e[1],
               "method": e[2], "path": e[3], "host": e[4], "status": e[5], "bytes": e[6]}
              for row in rows for e in json.loads(row.events)]
    if events:
        op.bulk_insert(_events, events)
    with op.batch_alter_table('usage_segments', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usage_segments_user_id'))
        batch_op.drop_index(batch_op.f('ix_usage_segments_last_at'))
        batch_op.drop_index(batch_op.f('ix_usage_segments_first_at'))
    op.drop_table('usage_segments')
