"""Account rules: register, authenticate, open and close sessions."""

from __future__ import annotations

import logging
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.config import Settings
from tessera.domain import events, mail
from tessera.domain.mail import MailWorker
from tessera.domain.policy import NEVER_ACCEPTED, PolicyCache, PolicyState
from tessera.domain.profiles import ProfileCache, generation_key
from tessera.errors import Problem
from tessera.metrics import Metrics
from tessera.security.passwords import PasswordHasher
from tessera.security.tokens import IssuedToken, issue_token, new_session_id, token_hash
from tessera.stores import mail as mail_store
from tessera.stores import mfa_login
from tessera.stores.audit import AuditTrail
from tessera.stores.keys import KeyRing
from tessera.stores.models import AuditEvent, User, utcnow
from tessera.stores.ratelimit import Limit
from tessera.stores.scrub import SnapshotScrubber, checkpoint_sqlite
from tessera.stores.sessions import SessionRecord, SessionStore
from tessera.stores.usage import UsageRecorder

audit_log = logging.getLogger("tessera.audit")
log = logging.getLogger("tessera.accounts")


def email_key(email: str) -> str:
    """The one key an address is unique, found and limited by (registration, login, email
    change, admin search; docs/security.md "Email keys"):

    - the domain as IDNA 2008 / UTS 46 normalises it (email-validator), in ASCII (punycode)
      and lower case: `B\u00dcCHER.de`, `xn--bcher-kva.de` and a fullwidth domain are one;
      `stra\u00dfe.de` and `strasse.de` are two (distinct DNS names);
    - the local part in NFC, then `str.lower()` (not `casefold()`, which folds `\u017f` to
      `s` and `\u00df` to `ss`): `Alice` and `alice` are one, `\u017fam` and `sam`, `stra\u00dfe`
      and `strasse` are two. NFD and NFC are one; compatibility forms (fullwidth `\uff41`)
      are not folded (no NFKC): a mail server delivers them to another mailbox.

    Input that is no valid address (a login's username can be anything) gets NFC + lower
    case, which matches no stored key unless the same text was stored."""
    text = unicodedata.normalize("NFC", email.strip())
    try:
        valid = validate_email(text, check_deliverability=False)
    except (EmailNotValidError, UnicodeError, ValueError):
        return unicodedata.normalize("NFC", text.lower())
    local = unicodedata.normalize("NFC", unicodedata.normalize("NFC", valid.local_part).lower())
    return f"{local}@{valid.ascii_domain.lower()}"


def password_work_limits(settings: Settings, account: str, ip: str) -> list[Limit]:
    """The counters every bcrypt verify takes, whatever its outcome (issue 12.3): per account
    (email key) and per client IP bucket, one minute each."""
    return [("password-work-account", account, settings.password_work_max_per_account_minute,
             60),
            ("password-work-ip", ip, settings.password_work_max_per_ip_minute, 60)]


def account_of(user: User) -> str:
    """The account a user's password work is counted and queued under: its email key."""
    return user.email_key or user.id


def invalid_credentials() -> Problem:
    return Problem("invalid_credentials", "The email or password is wrong.",
                   headers={"WWW-Authenticate": "Bearer"})


async def find_by_email(db: AsyncSession, email: str) -> User | None:
    return (await db.exec(select(User).where(User.email_key == email_key(email)))).first()


async def register_user(db: AsyncSession, hasher: PasswordHasher, *, email: str, password: str,
                        policy: PolicyState, accepted_policy: bool,
                        is_admin: bool = False,
                        on_create: Callable[[AsyncSession, User], None] | None = None) -> User:
    """A new account; `accepted_policy` only if the person accepted the current version
    (sent it): otherwise none is recorded and the policy gate asks first. `on_create` adds
    rows to the registration's own transaction (the verification mail)."""
    if await find_by_email(db, email) is not None:
        raise Problem("email_taken", "An account with this email exists.")
    now = utcnow()
    user = User(email=email, email_key=email_key(email), password_hash=await hasher.hash(password),
                is_admin=is_admin, created_at=now, updated_at=now)
    if accepted_policy:
        user.policy_version, user.policy_seq = policy.current.version, policy.current.seq or 0
        user.policy_accepted_at = now
    else:
        user.policy_seq = NEVER_ACCEPTED
    db.add(user)
    events.emit(db, "user.created", {"user_id": user.id})
    try:
        if on_create is not None:
            await db.flush()  # the user row first: the rows added next refer to it
            on_create(db, user)
        await db.commit()
    except IntegrityError:  # a concurrent registration won the race
        await db.rollback()
        raise Problem("email_taken", "An account with this email exists.") from None
    await db.refresh(user)
    return user


async def authenticate(db: AsyncSession, sessions: SessionStore, hasher: PasswordHasher,
                       email: str, password: str) -> tuple[User, str, str]:
    """The user for these credentials, and the user's auth epoch and profile generation read
    before the row the password is checked against (hand the epoch to `open_session`; both
    to a second step, domain/mfa.py `mfa_required`). An unknown email costs one hash, like a
    wrong password. Every attempt is audited (by user id) here, where the user is already at
    hand."""
    user = await find_by_email(db, email)
    epoch, generation = "0", ""
    if user is not None:
        # The epoch first, then the row again: a change committed before it was bumped is
        # seen in the row, one committed after it makes the session's creation fail. The
        # generation likewise (every committed change to a user moves it after its commit).
        epoch, seen = await sessions.epoch_with(user.id, generation_key(user.id))
        generation = seen or ""
        user = await fresh_user(db, user.id)
    ok, new_hash = await hasher.verify(password, user.password_hash if user else None,
                                       account=email_key(email))
    user_id = user.id if user else None
    if user is None or not ok:
        await audit(db, "login", user_id=user_id, outcome="failed")
        raise invalid_credentials()
    if new_hash is not None:  # the cost setting changed since this hash was made
        user.password_hash = new_hash
        db.add(user)
    if not user.is_active:
        await audit(db, "login", user_id=user_id, outcome="inactive")
        raise Problem("account_inactive", "This account is deactivated.")
    await audit(db, "login", user_id=user_id, outcome="ok")  # commits the rehash too
    return user, epoch, generation


async def fresh_user(db: AsyncSession, user_id: str) -> User | None:
    """The user's row as committed now (not as this unit of work last saw it)."""
    query = select(User).where(User.id == user_id).execution_options(populate_existing=True)
    return (await db.exec(query)).first()


async def superseded_login(db: AsyncSession, user_id: str) -> Problem:
    """What a login whose session was refused (the epoch moved) answers: as if it had come
    after the change."""
    await audit(db, "login", user_id=user_id, outcome="superseded")
    user = await fresh_user(db, user_id)
    if user is not None and user.password_hash is not None and not user.is_active:
        return Problem("account_inactive", "This account is deactivated.")
    return invalid_credentials()


async def verify_password(hasher: PasswordHasher, user: User, password: str) -> bool:
    ok, _ = await hasher.verify(password, user.password_hash, account=account_of(user))
    return ok


@dataclass(frozen=True)
class Logins:
    """Opening and ending sessions: a session is a signed token (`keys`, `settings` say for
    whom and how long) and its record in the session store; both ends are counted."""

    settings: Settings
    keys: KeyRing
    sessions: SessionStore
    token_key: bytes
    metrics: Metrics

    async def open(self, user: User, user_agent: str | None, *, epoch: str,
                   amr: list[str] | None = None, auth_time: int | None = None,
                   take: str | None = None, forget: Sequence[str] = ()) -> IssuedToken | None:
        """A new session, if the user's auth epoch is still `epoch` (read before the
        credentials were checked); None if a change that ends sessions happened meanwhile.
        `amr`: how the user authenticated (RFC 8176; a password alone by default). `take`,
        `forget`: a single-use key spent and keys cleared in the same Redis script as the
        session's creation (a second login step's mfa_token and attempt counter;
        `SessionStore.create`)."""
        issued, record = await self.prepare(user.id, user_agent, amr, auth_time=auth_time)
        if not await self.sessions.create(record, epoch=epoch, take=take, forget=forget):
            return None
        self.opened()
        return issued

    async def prepare(self, user_id: str, user_agent: str | None, amr: list[str] | None,
                      *, auth_time: int | None = None) -> tuple[IssuedToken, SessionRecord]:
        """A session's signed token and its record, not written yet: `open` writes it, and
        so does the TOTP second step's one script (domain/mfa.py `finish_with_totp`), which
        then calls `opened`."""
        s = self.settings
        await self.keys.maybe_refresh()  # a rotation on another instance reaches this one
        now = int(time.time())
        amr = list(amr) if amr is not None else ["pwd"]
        auth_time = auth_time if auth_time is not None else now
        issued = issue_token(self.keys, sub=user_id, sid=new_session_id(),
                             ttl_seconds=s.session_ttl_seconds, issuer=s.issuer,
                             audience=s.audience, now=now, amr=amr, auth_time=auth_time)
        return issued, SessionRecord(
            sid=issued.sid, user_id=user_id,
            token_hash=token_hash(self.token_key, issued.token),
            created_at=issued.iat, expires_at=issued.exp,
            user_agent=(user_agent or "")[:256] or None, amr=amr, auth_time=auth_time)

    def opened(self) -> None:
        self.metrics.sessions_issued.inc()

    async def epoch(self, user_id: str) -> str:
        """The user's auth epoch now (for a login whose credentials were checked elsewhere)."""
        return await self.sessions.epoch(user_id)

    async def revoke(self, user_id: str, sid: str, reason: str) -> bool:
        deleted = await self.sessions.delete(user_id, sid)
        if deleted:
            self.metrics.sessions_revoked.labels(reason).inc()
        return deleted

    async def revoke_all(self, user_id: str, reason: str, keep_sid: str | None = None) -> int:
        count = await self.sessions.delete_all(user_id, keep_sid=keep_sid)
        if count:
            self.metrics.sessions_revoked.labels(reason).inc(count)
        return count


def audit_later(audit_trail: AuditTrail, event: str, *, user_id: str,
                outcome: str | None = None,
                webhook: tuple[str, dict[str, Any]] | None = None) -> None:
    """A security event that needs no transaction of its own (logouts): buffered, written
    within the flush interval, off the request's critical path (stores/audit.py), with the
    `webhook` event it causes in the same transaction."""
    record: dict[str, Any] = {"event": event, "user_id": user_id}
    if outcome is not None:
        record["outcome"] = outcome
    audit_log.info("%s", event, extra={"audit": record})
    also = None
    if webhook is not None:
        kind, data = webhook
        events.check_type(kind)  # an unknown name fails here, on the request, not later

        def also(db: AsyncSession) -> None:
            events.emit(db, kind, data)

    audit_trail.record(event, user_id=user_id, outcome=outcome, also=also)


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


async def promote_to_admin(db: AsyncSession, user: User) -> None:
    """The admin role for an existing account (`tessera create-admin --promote`); the caller
    drops the cached profile (the CLI has no running services)."""
    user.is_admin = True
    user.updated_at = utcnow()
    db.add(user)
    await audit(db, "admin_promoted", user_id=user.id, commit=False)
    await db.commit()


async def user_changed(profiles: ProfileCache, user_id: str) -> None:
    """After a committed change to a user (their row, consents, policy acceptance): the
    cached profile (GET /me, the tracking decision, the policy gate) is dropped, so the next
    request sees the change. Every write to a user goes through a function here that ends
    with this; routes never touch the cache."""
    await profiles.invalidate(user_id)


async def user_changing(profiles: ProfileCache, user_id: str) -> None:
    """Before the commit of a change that must stop a login half done (a deactivation, a
    new password, a TOTP factor removed), besides `user_changed` after it: the generation
    moves before the commit too, so a second step begun before the change takes the full
    check, which reads the row, even if the process ends between the commit and what
    follows it (domain/mfa.py `finish_with_totp`). Best effort: a failure here must not stop
    the change. The bump after the commit still runs, and while Redis refuses writes the
    one-script step is closed anyway (a refused bump is kept and done later, as
    `ProfileCache.invalidate` does)."""
    try:
        await profiles.invalidate(user_id)
    except Exception as exc:
        log.warning("profile generation not moved before a change to user %s: %s", user_id,
                    type(exc).__name__)


async def set_restrictions(db: AsyncSession, profiles: ProfileCache, user: User, *,
                           restrict: bool, object_to: bool) -> User:
    user.restrict_processing = restrict
    user.object_to_processing = object_to
    user.updated_at = utcnow()
    db.add(user)
    await audit(db, "restrictions_changed", user_id=user.id, commit=False)
    events.emit(db, "restriction.changed", {
        "user_id": user.id, "restrict_processing": restrict, "object_to_processing": object_to})
    await db.commit()
    await user_changed(profiles, user.id)
    return user


async def set_consent(db: AsyncSession, settings: Settings, profiles: ProfileCache, user: User,
                      purpose: str, granted: bool) -> None:
    from tessera.domain import consents

    await consents.set_consent(db, user, purpose, granted, settings=settings)
    await user_changed(profiles, user.id)
    await audit(db, "consent_" + ("granted" if granted else "withdrawn"), user_id=user.id,
                detail=purpose)


async def accept_policy(db: AsyncSession, policy: PolicyCache, profiles: ProfileCache,
                        user: User, version: str) -> None:
    from tessera.domain.policy import accept_policy as record_acceptance

    policy.invalidate()
    await record_acceptance(db, user, version, await policy.get())
    await user_changed(profiles, user.id)
    await audit(db, "policy_accepted", user_id=user.id, detail=version)


async def reactivate(db: AsyncSession, profiles: ProfileCache, logins: Logins, user: User, *,
                     actor_id: str) -> None:
    user.is_active = True
    user.deactivated_at = None
    user.updated_at = utcnow()
    db.add(user)
    await audit(db, "reactivated", user_id=user.id, actor_id=actor_id, commit=False)
    events.emit(db, "user.reactivated", {"user_id": user.id})
    await db.commit()
    await user_changed(profiles, user.id)
    # No session from before the deactivation comes back with the account (issue 12.1).
    await logins.revoke_all(user.id, "reactivated")


async def change_password(db: AsyncSession, settings: Settings, hasher: PasswordHasher,
                          mail_worker: MailWorker, profiles: ProfileCache, logins: Logins,
                          user: User, current: str, new: str, keep_sid: str,
                          check_factor: Callable[[], Awaitable[None]] | None = None) -> None:
    """`check_factor`: the second-factor check, run once the current password is right."""
    if not await verify_password(hasher, user, current):
        raise Problem("wrong_password", "The current password is wrong.")
    if check_factor is not None:
        await check_factor()
    user.password_hash = await hasher.hash(new, account=account_of(user))
    user.updated_at = utcnow()
    db.add(user)
    await mail_store.end_tokens(db, user.id, "reset")  # any password change ends reset links
    mail.queue_password_changed(db, settings, user, "with the current password")
    await audit(db, "password_changed", user_id=user.id, commit=False)
    events.emit(db, "user.password_changed", {"user_id": user.id})
    await user_changing(profiles, user.id)
    await db.commit()
    mail_worker.wake()
    await user_changed(profiles, user.id)
    await logins.revoke_all(user.id, "password_changed", keep_sid=keep_sid)


async def deactivate(db: AsyncSession, profiles: ProfileCache, logins: Logins, user: User, *,
                     actor_id: str | None) -> None:
    user.is_active = False
    user.deactivated_at = user.updated_at = utcnow()
    db.add(user)
    await audit(db, "deactivated", user_id=user.id, actor_id=actor_id, commit=False)
    events.emit(db, "user.deactivated", {"user_id": user.id})
    await user_changing(profiles, user.id)
    await db.commit()
    await user_changed(profiles, user.id)
    await logins.revoke_all(user.id, "deactivated")


async def _erase_personal_rows(db: AsyncSession, user_id: str) -> None:
    from sqlmodel import col, delete, update

    from tessera.stores import mfa as mfa_store
    from tessera.stores.events import Disclosure
    from tessera.stores.models import ConsentEvent, PrivacyRequest, UsageSegment

    for table in (UsageSegment, ConsentEvent, PrivacyRequest, Disclosure):
        await db.exec(delete(table).where(col(table.user_id) == user_id))
    await mfa_store.erase_factors(db, user_id)  # TOTP, recovery codes, passkeys
    await mail_store.erase_mail_rows(db, user_id)  # outbox rows and tokens (P9)
    # The audit trail keeps what happened, anonymised: no link back to the person.
    await db.exec(update(AuditEvent).where(col(AuditEvent.user_id) == user_id)
                  .values(user_id=None))
    await db.exec(update(AuditEvent).where(col(AuditEvent.actor_id) == user_id)
                  .values(actor_id=None))


async def _tell_the_vendor_to_forget(db: AsyncSession, settings: Settings, user: User) -> None:
    """P8/P9: a mailing vendor that was given the email is told to delete it (queued in the
    caller's unit of work, before the email is erased)."""
    if not events.vendor_enabled(settings):
        return
    from tessera.domain.consents import has_consent

    await events.forget_at_vendor(db, settings, user,
                                  consented=await has_consent(db, user.id, "email_vendor"))


@dataclass(frozen=True)
class Erasure:
    """Forgetting a person (P5, P7, P9): everywhere their data lives, the usage log and the
    audit buffer, their sessions and cached profile, the rows, and the disk (SQLite's WAL,
    Redis's files)."""

    settings: Settings
    logins: Logins
    profiles: ProfileCache
    usage: UsageRecorder
    audit_trail: AuditTrail
    mail_worker: MailWorker
    engine: AsyncEngine
    scrubber: SnapshotScrubber

    async def delete_account(self, db: AsyncSession, user: User) -> None:
        """P5/P9: the account, its sessions, usage log and every row tied to it are gone."""
        user_id = user.id
        await self.usage.forget(user_id)
        await self.audit_trail.flush()  # buffered events of theirs are anonymised below too
        await self.logins.revoke_all(user_id, "account_deleted")
        await _tell_the_vendor_to_forget(db, self.settings, user)
        await _erase_personal_rows(db, user_id)
        if user.email is not None:  # the notice outlives the account until it is sent
            mail.queue_account_deleted(db, self.settings, user.email)
        await db.delete(user)
        await audit(db, "account_deleted", commit=False)
        await events.forget_events(db, user_id)
        # Subscribers delete their copy of the user's data (the policy's right to delete).
        events.emit(db, "user.deleted", {"user_id": user_id})
        await db.commit()
        self.mail_worker.wake()
        await self.profiles.forget(user_id)
        # Any login that raced the delete:
        await self.logins.revoke_all(user_id, "account_deleted")
        # After the last epoch bump: a first step in flight can keep no token after this.
        await mfa_login.forget(self.logins.sessions.redis, user_id)
        await self.scrub_traces()

    async def scrub_traces(self) -> None:
        """The deleted data off the disk too: the SQLite WAL, Redis's snapshot and AOF."""
        await checkpoint_sqlite(self.engine)
        self.scrubber.request()

    async def erase_minor(self, db: AsyncSession, user: User, *, actor_id: str) -> None:
        """P7: deactivate and delete the personal data, email included; the id stays as a
        tombstone."""
        await self.usage.forget(user.id)
        await self.audit_trail.flush()  # buffered events of theirs are anonymised below too
        await _tell_the_vendor_to_forget(db, self.settings, user)  # while the email is known
        user.is_active = False
        user.email = user.email_key = user.password_hash = None
        user.restrict_processing = user.object_to_processing = False
        user.deactivated_at = user.updated_at = utcnow()
        db.add(user)
        await _erase_personal_rows(db, user.id)
        await audit(db, "minor_erased", user_id=user.id, actor_id=actor_id, commit=False)
        events.emit(db, "user.erased", {"user_id": user.id})
        await db.commit()
        await user_changed(self.profiles, user.id)
        await self.logins.revoke_all(user.id, "minor_erased")
        await mfa_login.forget(self.logins.sessions.redis, user.id)  # after the epoch bump
        await self.scrub_traces()
