"""Second factors in SQL: TOTP secrets (encrypted), recovery codes (hashed), passkeys.

Every check that consumes something (a recovery code, a passkey's sign counter) is one
conditional UPDATE, so two instances can never both accept the same code; a TOTP time step
is taken in Redis (stores/mfa_login.py `accept_step`), beside the sessions it opens.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import datetime

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlmodel import Field, SQLModel, col, delete, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

# A module import: stores.keys may still be initialising (it imports models, which imports us).
from tessera.stores import keys
from tessera.stores.models import User, _ts, new_id, utcnow


class TotpFactor(SQLModel, table=True):
    """One TOTP authenticator per user; active once `confirmed_at` is set."""

    __tablename__ = "mfa_totp"

    user_id: str = Field(foreign_key="users.id", primary_key=True, max_length=32,
                         ondelete="CASCADE")
    secret_enc: str = Field(max_length=255)  # AES-GCM under a key derived from the secret
    created_at: datetime = _ts(default_factory=utcnow)
    confirmed_at: datetime | None = _ts(default=None)
    # No longer read or written: the last accepted time step is kept in Redis
    # (stores/mfa_login.py `accept_step`). The column stays for a rollback to 0.x.
    last_step: int = Field(default=0, sa_type=sa.BigInteger)


class RecoveryCode(SQLModel, table=True):
    __tablename__ = "mfa_recovery_codes"

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=32, ondelete="CASCADE")
    code_hash: str = Field(max_length=64)  # HMAC-SHA256 of the normalised code
    created_at: datetime = _ts(default_factory=utcnow)
    used_at: datetime | None = _ts(default=None)


class WebauthnUser(SQLModel, table=True):
    """The WebAuthn `user.id` of a user: random bytes, never the email or the account id."""

    __tablename__ = "webauthn_users"

    user_id: str = Field(foreign_key="users.id", primary_key=True, max_length=32,
                         ondelete="CASCADE")
    handle: str = Field(max_length=128, unique=True, index=True)  # base64url


class Passkey(SQLModel, table=True):
    __tablename__ = "passkeys"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=32, ondelete="CASCADE")
    credential_id: str = Field(max_length=1400, unique=True, index=True)  # base64url
    public_key: str = Field(sa_type=sa.Text)  # COSE key, base64url
    sign_count: int = Field(default=0, sa_type=sa.BigInteger)
    name: str = Field(max_length=64)
    transports: str | None = Field(default=None, max_length=255)  # comma-separated
    backed_up: bool = False
    created_at: datetime = _ts(default_factory=utcnow)
    last_used_at: datetime | None = _ts(default=None)


class SecretBox:
    """AES-GCM for TOTP secrets, under a key of its own derived from the service secret;
    the user id is bound in as associated data, so a secret moved to another row fails."""

    def __init__(self, secret: bytes) -> None:
        self._aead = AESGCM(keys.derive_key(secret, b"totp-secret-encryption"))
        self._code_key = keys.derive_key(secret, b"recovery-code-hash")
        self._totp_mac_key = keys.derive_key(secret, b"totp-code-mac")

    def encrypt(self, plaintext: str, user_id: str) -> str:
        nonce = os.urandom(12)
        return keys.b64url(nonce + self._aead.encrypt(nonce, plaintext.encode(), user_id.encode()))

    def decrypt(self, token: str, user_id: str) -> str:
        raw = keys.b64url_decode(token)
        return self._aead.decrypt(raw[:12], raw[12:], user_id.encode()).decode()

    def code_hash(self, normalised_code: str) -> str:
        # Codes carry 60 random bits: a keyed hash is as good as a slow one here.
        return hmac.new(self._code_key, normalised_code.encode(), hashlib.sha256).hexdigest()

    def totp_mac(self, user_id: str, step: int, code: str) -> str:
        """A keyed MAC of a TOTP code of a time step: the first login step keeps these for
        the steps its mfa_token can be used in, so the second compares the code sent
        without the secret (stores/mfa_login.py `finish`); worthless without the key."""
        message = f"{user_id}:{step}:{code}".encode()
        return hmac.new(self._totp_mac_key, message, hashlib.sha256).hexdigest()[:32]


async def factor_counts(db: AsyncSession, user_id: str) -> tuple[str | None, int, int]:
    """(the confirmed TOTP factor's sealed secret or None, passkeys, unused recovery codes)
    in one query."""
    def count(table: type[SQLModel], *where: sa.ColumnElement[bool]) -> sa.ScalarSelect[int]:
        return sa.select(sa.func.count()).select_from(table).where(*where).scalar_subquery()

    row = (await db.exec(sa.select(  # type: ignore[call-overload]
        sa.select(col(TotpFactor.secret_enc)).where(
            col(TotpFactor.user_id) == user_id,
            col(TotpFactor.confirmed_at).is_not(None)).scalar_subquery(),
        count(Passkey, col(Passkey.user_id) == user_id),
        count(RecoveryCode, col(RecoveryCode.user_id) == user_id,
              col(RecoveryCode.used_at).is_(None))))).one()
    return (str(row[0]) if row[0] is not None else None), int(row[1]), int(row[2])


# --- TOTP ---------------------------------------------------------------------------------

async def get_totp(db: AsyncSession, user_id: str) -> TotpFactor | None:
    return await db.get(TotpFactor, user_id)


async def user_with_totp(db: AsyncSession, user_id: str) -> tuple[User | None,
                                                                  TotpFactor | None]:
    """The user's row and TOTP factor (None if none), in one query."""
    row = (await db.exec(select(User, TotpFactor)
                         .outerjoin(TotpFactor, col(TotpFactor.user_id) == col(User.id))
                         .where(col(User.id) == user_id))).first()
    if row is None:
        return None, None
    return row[0], row[1]


async def put_pending_totp(db: AsyncSession, user_id: str, secret_enc: str) -> None:
    """A new, unconfirmed secret (replacing an unconfirmed one, never a confirmed one: an
    enrolment confirmed meanwhile makes the insert fail, IntegrityError)."""
    await db.exec(delete(TotpFactor).where(col(TotpFactor.user_id) == user_id,
                                           col(TotpFactor.confirmed_at).is_(None)))
    db.add(TotpFactor(user_id=user_id, secret_enc=secret_enc))
    await db.commit()


async def confirm_totp(db: AsyncSession, user_id: str) -> bool:
    result = await db.exec(
        update(TotpFactor)
        .where(col(TotpFactor.user_id) == user_id, col(TotpFactor.confirmed_at).is_(None))
        .values(confirmed_at=utcnow()))
    return bool(result.rowcount)


async def delete_totp(db: AsyncSession, user_id: str) -> None:
    await db.exec(delete(TotpFactor).where(col(TotpFactor.user_id) == user_id))
    await db.exec(delete(RecoveryCode).where(col(RecoveryCode.user_id) == user_id))


# --- recovery codes -----------------------------------------------------------------------

_CODE_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read off paper


def normalise_code(code: str) -> str:
    return "".join(ch for ch in code.strip().lower() if ch not in "- ")


def new_recovery_codes(count: int = 10) -> list[str]:
    """Codes like `k7mq-2xwz-hp4c`: 12 characters of 31, about 59 bits each."""
    codes = []
    for _ in range(count):
        raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(12))
        codes.append(f"{raw[:4]}-{raw[4:8]}-{raw[8:]}")
    return codes


async def replace_recovery_codes(db: AsyncSession, box: SecretBox, user_id: str,
                                 codes: list[str]) -> None:
    """The old set stops working; the caller commits."""
    await db.exec(delete(RecoveryCode).where(col(RecoveryCode.user_id) == user_id))
    now = utcnow()
    for code in codes:
        db.add(RecoveryCode(user_id=user_id, code_hash=box.code_hash(normalise_code(code)),
                            created_at=now))


async def use_recovery_code(db: AsyncSession, box: SecretBox, user_id: str, code: str) -> bool:
    """Mark the code used if it is one of the user's unused codes (atomic: once, ever)."""
    result = await db.exec(
        update(RecoveryCode)
        .where(col(RecoveryCode.user_id) == user_id,
               col(RecoveryCode.code_hash) == box.code_hash(normalise_code(code)),
               col(RecoveryCode.used_at).is_(None))
        .values(used_at=utcnow()))
    return bool(result.rowcount)


async def recovery_codes(db: AsyncSession, user_id: str) -> list[RecoveryCode]:
    return list((await db.exec(select(RecoveryCode)
                               .where(col(RecoveryCode.user_id) == user_id))).all())


# --- passkeys -----------------------------------------------------------------------------

async def webauthn_handle(db: AsyncSession, user_id: str, *, create: bool) -> str | None:
    row = await db.get(WebauthnUser, user_id)
    if row is None and create:
        row = WebauthnUser(user_id=user_id, handle=keys.b64url(secrets.token_bytes(32)))
        db.add(row)
        await db.commit()
    return row.handle if row else None


async def user_for_handle(db: AsyncSession, handle: str) -> str | None:
    row = (await db.exec(select(WebauthnUser).where(col(WebauthnUser.handle) == handle))).first()
    return row.user_id if row else None


async def passkeys_of(db: AsyncSession, user_id: str) -> list[Passkey]:
    return list((await db.exec(select(Passkey).where(col(Passkey.user_id) == user_id)
                               .order_by(col(Passkey.created_at)))).all())


async def passkey_by_credential(db: AsyncSession, credential_id: str) -> Passkey | None:
    return (await db.exec(select(Passkey)
                          .where(col(Passkey.credential_id) == credential_id))).first()


async def record_passkey_use(db: AsyncSession, key: Passkey, new_count: int,
                             backed_up: bool) -> bool:
    """Move the sign counter on from exactly the value checked (atomic: a concurrent use of
    the same assertion, or a cloned authenticator, loses)."""
    result = await db.exec(
        update(Passkey)
        .where(col(Passkey.id) == key.id, col(Passkey.sign_count) == key.sign_count)
        .values(sign_count=new_count, last_used_at=utcnow(), backed_up=backed_up))
    return bool(result.rowcount)


async def erase_factors(db: AsyncSession, user_id: str) -> None:
    """Account deletion and minor erasure: every factor goes; the caller commits."""
    for table in (TotpFactor, RecoveryCode, Passkey, WebauthnUser):
        await db.exec(delete(table).where(col(table.user_id) == user_id))
