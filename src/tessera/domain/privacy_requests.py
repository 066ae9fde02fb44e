"""Privacy requests (P6): rights requests with their legal due dates."""

from __future__ import annotations

from datetime import datetime, timedelta

import pycountry
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.errors import Problem
from tessera.stores.models import PrivacyRequest, utcnow
from tessera.timeutil import as_utc

KINDS = ("confirm", "access", "rectify", "delete", "restrict", "portability", "object",
         "withdraw_consent")
# Mainland China: 15 business days. Everywhere else: 30 calendar days.
BUSINESS_DAY_REGIONS = {"CN": 15}
DEFAULT_DAYS = 30


def normalise_region(region: str) -> str:
    code = region.strip().upper()
    if len(code) != 2 or pycountry.countries.get(alpha_2=code) is None:
        raise ValueError("region must be an ISO 3166-1 alpha-2 country code")
    return code


def add_business_days(start: datetime, days: int) -> datetime:
    """`days` Monday-to-Friday days after `start` (counted in UTC), same time of day."""
    current = as_utc(start)
    added = 0
    while added < days:
        current += timedelta(days=1)
        if current.weekday() < 5:
            added += 1
    return current


def due_date(created_at: datetime, region: str) -> datetime:
    if region in BUSINESS_DAY_REGIONS:
        return add_business_days(created_at, BUSINESS_DAY_REGIONS[region])
    return as_utc(created_at) + timedelta(days=DEFAULT_DAYS)


async def file_request(db: AsyncSession, user_id: str, kind: str, region: str,
                       message: str | None) -> PrivacyRequest:
    now = utcnow().replace(microsecond=0)
    row = PrivacyRequest(user_id=user_id, kind=kind, region=region, message=message,
                         created_at=now, due_at=due_date(now, region))
    db.add(row)
    await db.commit()
    await db.refresh(row)
    return row


async def user_requests(db: AsyncSession, user_id: str) -> list[PrivacyRequest]:
    return list((await db.exec(select(PrivacyRequest).where(PrivacyRequest.user_id == user_id)
                               .order_by(col(PrivacyRequest.created_at)))).all())


async def admin_list(db: AsyncSession, *, status: str | None,
                     overdue: bool) -> list[PrivacyRequest]:
    query = select(PrivacyRequest)
    if overdue:
        query = query.where(PrivacyRequest.status == "open",
                            col(PrivacyRequest.due_at) < utcnow())
    if status:
        query = query.where(PrivacyRequest.status == status)
    return list((await db.exec(query.order_by(col(PrivacyRequest.due_at),
                                              col(PrivacyRequest.id)))).all())


async def close_request(db: AsyncSession, request_id: str, status: str,
                        resolution: str | None) -> PrivacyRequest:
    row = await db.get(PrivacyRequest, request_id) if len(request_id) <= 32 else None
    if row is None:
        raise Problem("not_found", "No such privacy request.")
    if row.status != "open":
        raise Problem("already_closed", "This request is already closed.")
    row.status = status
    row.resolution = resolution
    row.resolved_at = utcnow()
    db.add(row)
    await db.commit()
    await db.refresh(row)
    return row
