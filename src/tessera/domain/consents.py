"""Consents (P8): each grant and withdrawal kept with its time; nothing reaches the mailing
vendor without `email_vendor` consent."""

from __future__ import annotations

from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.config import Settings
from tessera.domain import events
from tessera.errors import Problem
from tessera.stores.models import ConsentEvent, User, utcnow
from tessera.timeutil import rfc3339

PURPOSES = ("email_vendor", "analytics")


async def consent_history(db: AsyncSession, user_id: str) -> list[ConsentEvent]:
    return list((await db.exec(select(ConsentEvent).where(ConsentEvent.user_id == user_id)
                               .order_by(col(ConsentEvent.at), col(ConsentEvent.id)))).all())


async def current_consents(db: AsyncSession, user_id: str) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {p: {"granted": False, "updated_at": None}
                                        for p in PURPOSES}
    for event in await consent_history(db, user_id):
        if event.purpose in state:
            state[event.purpose] = {"granted": event.granted, "updated_at": rfc3339(event.at)}
    return state


async def set_consent(db: AsyncSession, user: User, purpose: str, granted: bool, *,
                      settings: Settings) -> None:
    """Record a grant or withdrawal. For `email_vendor`, a grant hands the email to the
    mailing vendor and a withdrawal tells it to delete it (queued in this transaction)."""
    if purpose not in PURPOSES:
        raise Problem("not_found", f"Unknown purpose; known: {', '.join(PURPOSES)}.")
    if purpose == "email_vendor" and events.vendor_enabled(settings):
        before = await has_consent(db, user.id, purpose)
        if granted and not before and user.email is not None:
            hand_over_to_mailing_vendor(db, settings, user, consented=True)
        elif not granted and before and user.email is not None:
            await events.drop_pending_upserts(db, user.id)
            events.queue_vendor(db, settings, user.id, events.VENDOR_DELETE, user.email)
    db.add(ConsentEvent(user_id=user.id, purpose=purpose, granted=granted, at=utcnow()))
    events.emit(db, "consent.changed", {"user_id": user.id, "purpose": purpose,
                                        "granted": granted})
    await db.commit()


async def has_consent(db: AsyncSession, user_id: str, purpose: str) -> bool:
    return bool((await current_consents(db, user_id))[purpose]["granted"])


def hand_over_to_mailing_vendor(db: AsyncSession, settings: Settings, user: User, *,
                                consented: bool) -> None:
    """The one way personal data reaches the mailing vendor: an upsert of the email, only
    with `email_vendor` consent (the caller has just read or recorded it), queued in the
    caller's unit of work and sent by the event worker (domain/events.py)."""
    if not consented or not user.is_active or user.email is None:
        raise Problem("consent_required",
                      "The user has not consented to sharing with the mailing vendor.")
    events.queue_vendor(db, settings, user.id, events.VENDOR_UPSERT, user.email)
