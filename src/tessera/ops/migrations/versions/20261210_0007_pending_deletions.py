"""pending_deletions: session deletions Redis refused, kept until one is done (issue 12.10)

Revision ID: 0007_h_durable
Revises: 0003
Create Date: 2026-12-10

A logout, logout-all, deactivation or account deletion that Redis refused (MISCONF, READONLY,
OOM) is written here before it answers 503; every instance refuses sessions while Redis
refuses writes, and the first to find Redis writable again does the deletions and deletes
the rows (stores/durability.py:WriteGate). The table is empty in normal operation.
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0007_h_durable'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'pending_deletions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('arg', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column('redis', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False,
                  server_default=''),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )


def downgrade() -> None:
    op.drop_table('pending_deletions')
