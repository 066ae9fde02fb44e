"""/me: the logged-in user's own account and rights (P5)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlmodel.ext.asyncio.session import AsyncSession

from app.api.deps import CurrentUserAnyPolicy, DbDep
from app.consents import current_consents
from app.models import User
from app.timeutil import rfc3339

router = APIRouter(prefix="/me", tags=["me"])

NO_STORE = {"Cache-Control": "no-store"}


async def account_view(db: AsyncSession, user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "created_at": rfc3339(user.created_at),
        "is_active": user.is_active,
        "is_admin": user.is_admin,
        "policy_version": user.policy_version,
        "consents": await current_consents(db, user.id),
        "restrictions": {"restrict_processing": user.restrict_processing,
                         "object_to_processing": user.object_to_processing},
    }


@router.get("")
async def get_me(user: CurrentUserAnyPolicy, db: DbDep, response: Response) -> dict[str, Any]:
    response.headers.update(NO_STORE)
    return await account_view(db, user)
