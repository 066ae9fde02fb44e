"""email keys by one rule: NFC + lower-case local part, IDNA ASCII lower-case domain

Revision ID: 0006
Revises: 0002
Create Date: 2026-12-01

`users.email_key` was `casefold()` of the address, which made distinct addresses collide
(`\u017fam@` and `sam@`, `stra\u00dfe@` and `strasse@`). Every key is recomputed from the
stored address by the rule of `tessera.domain.accounts.email_key` (copied here, frozen). For
ASCII addresses nothing changes. Should an account's new key be another account's key
(only possible with a fullwidth or other compatibility form in the domain), it keeps its old
key and a warning names its id; the operator decides. The downgrade recomputes the
casefold keys the same way.
"""
import logging
import unicodedata
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op
from email_validator import EmailNotValidError, validate_email

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

_users = sa.table("users", sa.column("id", sa.String), sa.column("email", sa.String),
                  sa.column("email_key", sa.String), sa.column("created_at", sa.DateTime))


def _new_key(email: str) -> str:
    text = unicodedata.normalize("NFC", email.strip())
    try:
        valid = validate_email(text, check_deliverability=False)
    except (EmailNotValidError, UnicodeError, ValueError):
        return unicodedata.normalize("NFC", text.lower())
    local = unicodedata.normalize("NFC", unicodedata.normalize("NFC", valid.local_part).lower())
    return f"{local}@{valid.ascii_domain.lower()}"


def _old_key(email: str) -> str:
    return email.strip().casefold()


def _rekey(key_of: Callable[[str], str]) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(_users.c.id, _users.c.email, _users.c.email_key)
                        .where(_users.c.email.is_not(None))
                        .order_by(_users.c.created_at, _users.c.id)).all()
    taken = {row.email_key for row in rows}
    for row in rows:
        key = key_of(row.email)
        if key == row.email_key:
            continue
        if key in taken:
            log.warning("user %s keeps its old email key: another account has the new one",
                        row.id)
            continue
        conn.execute(sa.update(_users).where(_users.c.id == row.id).values(email_key=key))
        taken.discard(row.email_key)
        taken.add(key)


def upgrade() -> None:
    _rekey(_new_key)


def downgrade() -> None:
    _rekey(_old_key)
