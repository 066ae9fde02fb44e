"""Consents (P8): each grant and withdrawal kept with its time; nothing reaches the mailing
vendor without `email_vendor` consent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

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


async def set_consent(db: AsyncSession, user_id: str, purpose: str, granted: bool) -> None:
    if purpose not in PURPOSES:
        raise Problem(404, "not_found", f"Unknown purpose; known: {', '.join(PURPOSES)}.")
    db.add(ConsentEvent(user_id=user_id, purpose=purpose, granted=granted, at=utcnow()))
    await db.commit()


async def has_consent(db: AsyncSession, user_id: str, purpose: str) -> bool:
    return bool((await current_consents(db, user_id))[purpose]["granted"])


MailingVendorSend = Callable[[dict[str, Any]], Awaitable[None]]


async def hand_over_to_mailing_vendor(db: AsyncSession, user: User, send: MailingVendorSend,
                                      **fields: Any) -> None:
    """The one way personal data reaches the mailing vendor: only with `email_vendor` consent."""
    if not user.is_active or user.email is None or not await has_consent(
            db, user.id, "email_vendor"):
        raise Problem(403, "consent_required",
                      "The user has not consented to sharing with the mailing vendor.")
    await send({"email": user.email, **fields})
