"""Account rules: register, authenticate, open and close sessions."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy.exc import IntegrityError
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.domain import mail
from tessera.domain.policy import PolicyState
from tessera.errors import Problem
from tessera.security.passwords import PasswordHasher
from tessera.security.tokens import IssuedToken, issue_token, new_session_id, token_hash
from tessera.services import Tessera
from tessera.stores import mail as mail_store
from tessera.stores.models import AuditEvent, User, utcnow
from tessera.stores.sessions import SessionRecord

audit_log = logging.getLogger("tessera.audit")


def email_key(email: str) -> str:
    return email.strip().casefold()


def invalid_credentials() -> Problem:
    return Problem(401, "invalid_credentials", "The email or password is wrong.",
                   headers={"WWW-Authenticate": "Bearer"})


async def find_by_email(db: AsyncSession, email: str) -> User | None:
    return (await db.exec(select(User).where(User.email_key == email_key(email)))).first()


async def register_user(db: AsyncSession, hasher: PasswordHasher, *, email: str, password: str,
                        policy: PolicyState, is_admin: bool = False,
                        on_create: Callable[[AsyncSession, User], None] | None = None) -> User:
    """`on_create` adds rows to the registration's own transaction (the verification mail)."""
    if await find_by_email(db, email) is not None:
        raise Problem(409, "email_taken", "An account with this email exists.")
    now = utcnow()
    user = User(email=email, email_key=email_key(email), password_hash=await hasher.hash(password),
                is_admin=is_admin, created_at=now, updated_at=now,
                policy_version=policy.current.version, policy_seq=policy.current.seq or 0,
                policy_accepted_at=now)
    db.add(user)
    try:
        if on_create is not None:
            await db.flush()  # the user row first: the rows added next refer to it
            on_create(db, user)
        await db.commit()
    except IntegrityError:  # a concurrent registration won the race
        await db.rollback()
        raise Problem(409, "email_taken", "An account with this email exists.") from None
    await db.refresh(user)
    return user


async def authenticate(db: AsyncSession, hasher: PasswordHasher, email: str,
                       password: str) -> User:
    """The user for these credentials; an unknown email costs one hash, like a wrong password.
    Every attempt is audited (by user id) here, where the user is already at hand."""
    user = await find_by_email(db, email)
    ok, new_hash = await hasher.verify(password, user.password_hash if user else None)
    user_id = user.id if user else None
    if user is None or not ok:
        await audit(db, "login", user_id=user_id, outcome="failed")
        raise invalid_credentials()
    if new_hash is not None:  # the cost setting changed since this hash was made
        user.password_hash = new_hash
        db.add(user)
    if not user.is_active:
        await audit(db, "login", user_id=user_id, outcome="inactive")
        raise Problem(403, "account_inactive", "This account is deactivated.")
    await audit(db, "login", user_id=user_id, outcome="ok")  # commits the rehash too
    return user


async def verify_password(hasher: PasswordHasher, user: User, password: str) -> bool:
    ok, _ = await hasher.verify(password, user.password_hash)
    return ok


async def open_session(t: Tessera, user: User, user_agent: str | None) -> IssuedToken:
    s = t.settings
    await t.keys.maybe_refresh()  # a rotation on another instance reaches this one
    issued = issue_token(t.keys, sub=user.id, sid=new_session_id(),
                         ttl_seconds=s.session_ttl_seconds, issuer=s.issuer,
                         audience=s.audience, now=int(time.time()))
    await t.sessions.create(SessionRecord(
        sid=issued.sid, user_id=user.id, token_hash=token_hash(t.token_key, issued.token),
        created_at=issued.iat, expires_at=issued.exp,
        user_agent=(user_agent or "")[:256] or None))
    t.metrics.sessions_issued.inc()
    return issued


async def revoke_session(t: Tessera, user_id: str, sid: str, reason: str) -> bool:
    deleted = await t.sessions.delete(user_id, sid)
    if deleted:
        t.metrics.sessions_revoked.labels(reason).inc()
    return deleted


async def revoke_all_sessions(t: Tessera, user_id: str, reason: str,
                              keep_sid: str | None = None) -> int:
    count = await t.sessions.delete_all(user_id, keep_sid=keep_sid)
    if count:
        t.metrics.sessions_revoked.labels(reason).inc(count)
    return count


async def audit(db: AsyncSession, event: str, *, user_id: str | None = None,
                actor_id: str | None = None, outcome: str | None = None,
                detail: str | None = None, commit: bool = True) -> None:
    """Security event: ids only, never an email, password or token."""
    audit_log.info("%s", event, extra={"audit": {
        "event": event, "user_id": user_id, "actor_id": actor_id, "outcome": outcome}})
    db.add(AuditEvent(event=event, user_id=user_id, actor_id=actor_id, outcome=outcome,
                      detail=detail))
    if commit:
        await db.commit()


async def change_password(t: Tessera, db: AsyncSession, user: User, current: str, new: str,
                          keep_sid: str) -> None:
    if not await verify_password(t.hasher, user, current):
        raise Problem(403, "invalid_credentials", "The current password is wrong.")
    user.password_hash = await t.hasher.hash(new)
    user.updated_at = utcnow()
    db.add(user)
    await mail_store.end_tokens(db, user.id, "reset")  # any password change ends reset links
    mail.queue_password_changed(db, t.settings, user, "with the current password")
    await audit(db, "password_changed", user_id=user.id, commit=False)
    await db.commit()
    t.mail.wake()
    await revoke_all_sessions(t, user.id, "password_changed", keep_sid=keep_sid)


async def has_second_factor(db: AsyncSession, user: User) -> bool:
    """Hook for second factors (issue 14): True when the account has a second factor
    enrolled (TOTP, passkey), so that a password reset also asks for a `code`
    (`POST /auth/password-reset/confirm` answers 401 `mfa_required` without a valid one).
    No second factors exist yet: always False."""
    return False


async def check_second_factor(db: AsyncSession, user: User, code: str | None) -> bool:
    """Hook for second factors (issue 14): whether `code` (a TOTP or recovery code) is a
    valid second factor of the account. Only asked when `has_second_factor` is True."""
    return False


async def deactivate(t: Tessera, db: AsyncSession, user: User, *, actor_id: str | None) -> None:
    user.is_active = False
    user.deactivated_at = user.updated_at = utcnow()
    db.add(user)
    await audit(db, "deactivated", user_id=user.id, actor_id=actor_id, commit=False)
    await db.commit()
    await t.profiles.invalidate(user.id)
    await revoke_all_sessions(t, user.id, "deactivated")


async def _erase_personal_rows(db: AsyncSession, user_id: str) -> None:
    from sqlmodel import col, delete, update

    from tessera.stores.models import ConsentEvent, PrivacyRequest, UsageSegment

    for table in (UsageSegment, ConsentEvent, PrivacyRequest):
        await db.exec(delete(table).where(col(table.user_id) == user_id))
    await mail_store.erase_mail_rows(db, user_id)  # outbox rows and tokens (P9)
    # The audit trail keeps what happened, anonymised: no link back to the person.
    await db.exec(update(AuditEvent).where(col(AuditEvent.user_id) == user_id)
                  .values(user_id=None))
    await db.exec(update(AuditEvent).where(col(AuditEvent.actor_id) == user_id)
                  .values(actor_id=None))


async def delete_account(t: Tessera, db: AsyncSession, user: User) -> None:
    """P5/P9: the account, its sessions, usage log and every row tied to it are gone."""
    user_id = user.id
    await t.usage.forget(user_id)
    await revoke_all_sessions(t, user_id, "account_deleted")
    await _erase_personal_rows(db, user_id)
    if user.email is not None:  # the notice outlives the account until it is sent
        mail.queue_account_deleted(db, t.settings, user.email)
    await db.delete(user)
    await audit(db, "account_deleted", commit=False)
    await db.commit()
    t.mail.wake()
    await t.profiles.invalidate(user_id)
    await revoke_all_sessions(t, user_id, "account_deleted")  # any login that raced the delete


async def erase_minor(t: Tessera, db: AsyncSession, user: User, *, actor_id: str) -> None:
    """P7: deactivate and delete the personal data, email included; the id stays as a tombstone."""
    await t.usage.forget(user.id)
    user.is_active = False
    user.email = user.email_key = user.password_hash = None
    user.restrict_processing = user.object_to_processing = False
    user.deactivated_at = user.updated_at = utcnow()
    db.add(user)
    await _erase_personal_rows(db, user.id)
    await audit(db, "minor_erased", user_id=user.id, actor_id=actor_id, commit=False)
    await db.commit()
    await t.profiles.invalidate(user.id)
    await revoke_all_sessions(t, user.id, "minor_erased")
