"""Accounts people can recover: email verification, password reset, email change.

Every token is single use, stored only as a hash (stores/mail.py) and tied to the user and
the address it was mailed to: a token for an address the account no longer has is invalid.
Nothing about an account changes until a valid token is presented.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.config import Settings
from tessera.domain import events, mail
from tessera.domain.accounts import (
    Logins,
    audit,
    email_key,
    find_by_email,
    user_changing,
    verify_password,
)
from tessera.domain.mail import MailWorker
from tessera.domain.mfa import SecondFactors
from tessera.domain.profiles import ProfileCache
from tessera.errors import Problem
from tessera.security.passwords import PasswordHasher
from tessera.stores import mail as store
from tessera.stores.mail import MailToken
from tessera.stores.models import User, utcnow


def invalid_token() -> Problem:
    return Problem("invalid_token", "The token is unknown, used or expired.")


def email_taken() -> Problem:
    return Problem("email_taken", "An account with this email exists.")


async def _owner(db: AsyncSession, row: MailToken | None, *, address: str | None) -> User:
    """The active user a live token belongs to, while `address` is still theirs."""
    if row is None:
        raise invalid_token()
    user = await db.get(User, row.user_id)
    if user is None or not user.is_active or user.email_key is None:
        raise invalid_token()
    if address is not None and email_key(address) != user.email_key:
        raise invalid_token()  # sent to an address the account no longer has
    return user


# --- verification ----------------------------------------------------------------------------

async def verify_email(db: AsyncSession, profiles: ProfileCache, token: str) -> User:
    row = await mail.take_token(db, token, "verify")
    user = await _owner(db, row, address=row.email if row else None)
    user.email_verified = True
    user.updated_at = utcnow()
    db.add(user)
    await store.end_tokens(db, user.id, "verify")
    events.emit(db, "user.email_verified", {"user_id": user.id})
    await audit(db, "email_verified", user_id=user.id, commit=False)
    await db.commit()
    await profiles.invalidate(user.id)
    return user


async def resend_verification(db_factory: async_sessionmaker[AsyncSession], settings: Settings,
                              mail_worker: MailWorker, email: str) -> None:
    """The known-address part of a resend, run after the 202 went out: a new token and mail
    for an active, unverified account; nothing for any other address."""
    async with db_factory() as db:
        user = await find_by_email(db, email)
        if user is None or not user.is_active or user.email_verified or user.email is None:
            return
        mail.queue_verification(db, settings, user)
        await db.commit()
    mail_worker.wake()


# --- password reset --------------------------------------------------------------------------

async def request_reset(db_factory: async_sessionmaker[AsyncSession], settings: Settings,
                        mail_worker: MailWorker, email: str) -> None:
    """The known-address part of a reset request, run after the 202 went out."""
    async with db_factory() as db:
        user = await find_by_email(db, email)
        if (user is None or not user.is_active or user.email is None
                or user.password_hash is None):
            return
        mail.queue_reset(db, settings, user)
        await audit(db, "password_reset_requested", user_id=user.id, commit=False)
        await db.commit()
    mail_worker.wake()


async def confirm_reset(db: AsyncSession, settings: Settings, hasher: PasswordHasher,
                        mail_worker: MailWorker, profiles: ProfileCache, logins: Logins,
                        factors: SecondFactors, token: str, new_password: str,
                        code: str | None) -> None:
    """A valid token sets the new password; every session and every reset token of the user
    end; a notice goes to the address. No login follows."""
    row = await store.find_token(db, token, "reset")
    user = await _owner(db, row, address=row.email if row else None)
    assert row is not None
    # An account with a second factor asks for it too (a TOTP or recovery code): a mailbox
    # alone does not take it over. Nothing changes before both are right.
    from tessera.domain.mfa import require_second_factor

    await require_second_factor(db, factors, user, code=code)
    new_hash = await hasher.hash(new_password)
    if not await store.use_token(db, row):  # another request used it meanwhile
        await db.rollback()
        raise invalid_token()
    await store.end_tokens(db, user.id, "reset")
    user.password_hash = new_hash
    # The mail reached the address: it is verified as a verification mail would have.
    user.email_verified = True
    user.updated_at = utcnow()
    db.add(user)
    mail.queue_password_changed(db, settings, user, "with a password reset link")
    events.emit(db, "user.password_changed", {"user_id": user.id})
    await audit(db, "password_reset", user_id=user.id, commit=False)
    await user_changing(profiles, user.id)
    await db.commit()
    mail_worker.wake()
    await profiles.invalidate(user.id)
    await logins.revoke_all(user.id, "password_reset")


# --- email change ----------------------------------------------------------------------------

async def request_email_change(db: AsyncSession, settings: Settings, hasher: PasswordHasher,
                               mail_worker: MailWorker, profiles: ProfileCache,
                               factors: SecondFactors,
                               user: User, new_email: str, password: str,
                               factor: dict[str, Any] | None = None) -> bool:
    """True when a change was requested (mails queued); False for the address it has now.
    A sensitive change: the current password and, where one is enrolled, a second factor
    (`factor`: `code`, or `challenge_id` + `credential`)."""
    if not await verify_password(hasher, user, password):
        raise Problem("wrong_password", "The current password is wrong.")
    if email_key(new_email) == user.email_key:
        return False
    from tessera.domain.mfa import require_second_factor

    await require_second_factor(db, factors, user, **(factor or {"code": None}))
    if await find_by_email(db, new_email) is not None:
        raise email_taken()
    await mail.queue_email_change(db, settings, user, new_email)
    user.pending_email = new_email
    user.updated_at = utcnow()
    db.add(user)
    await audit(db, "email_change_requested", user_id=user.id, commit=False)
    await db.commit()
    mail_worker.wake()
    await profiles.invalidate(user.id)
    return True


async def confirm_email_change(db: AsyncSession, settings: Settings, profiles: ProfileCache,
                               token: str) -> User:
    row = await store.find_token(db, token, "email_change")
    user = await _owner(db, row, address=None)
    assert row is not None
    key = email_key(row.email)
    other = await find_by_email(db, row.email)
    if other is not None and other.id != user.id:
        raise email_taken()
    if not await store.use_token(db, row):
        await db.rollback()
        raise invalid_token()
    old_email = user.email
    if events.vendor_enabled(settings) and old_email is not None:  # P8: delete, upsert
        from tessera.domain.consents import has_consent

        events.on_email_changed_at_vendor(
            db, settings, user.id, old_email, row.email,
            consented=await has_consent(db, user.id, "email_vendor"))
    user.email, user.email_key, user.email_verified = row.email, key, True
    user.pending_email = None
    user.updated_at = utcnow()
    db.add(user)
    # Links mailed to the old address (verification, reset) no longer apply.
    for purpose in store.TOKEN_PURPOSES:
        await store.end_tokens(db, user.id, purpose)
    events.emit(db, "user.email_changed", {"user_id": user.id})
    await audit(db, "email_changed", user_id=user.id, commit=False)
    try:
        await db.commit()
    except IntegrityError:  # a registration took the address between the check and now
        await db.rollback()
        raise email_taken() from None
    await db.refresh(user)
    await profiles.invalidate(user.id)
    return user
