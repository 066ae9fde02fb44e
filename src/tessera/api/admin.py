"""/admin: users, minors (P7), privacy requests (P6), policy versions (P10). Admin role only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlmodel import col, select

from tessera.api.deps import AdminUser, DbDep, ErasureDep, LoginsDep, PolicyDep, ProfilesDep
from tessera.api.me import privacy_request_view
from tessera.api.schemas import SafeStr
from tessera.domain import accounts, privacy_requests
from tessera.domain.policy import publish_policy
from tessera.errors import Problem, problem_doc, problem_responses
from tessera.stores.models import User
from tessera.timeutil import rfc3339

router = APIRouter(
    prefix="/admin", tags=["admin"],
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
)

NO_STORE = {"Cache-Control": "no-store"}
UserId = Annotated[str, Path(max_length=64)]


class CloseRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["completed", "rejected"]
    resolution: SafeStr | None = Field(default=None, max_length=2000)


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")
    substantial: StrictBool


def user_view(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "created_at": rfc3339(user.created_at),
            "is_active": user.is_active, "is_admin": user.is_admin,
            "policy_version": user.policy_version,
            "restrictions": {"restrict_processing": user.restrict_processing,
                             "object_to_processing": user.object_to_processing}}


async def _target(db: DbDep, user_id: str) -> User:
    user = await db.get(User, user_id)
    if user is None:
        raise Problem("not_found", "No such user.")
    return user


@router.get("/users")
async def find_users(admin: AdminUser, db: DbDep, response: Response,
                     email: Annotated[SafeStr | None, Query(max_length=320)] = None,
                     ) -> list[dict[str, Any]]:
    query = select(User).order_by(col(User.created_at)).limit(100)
    if email is not None:
        query = query.where(User.email_key == accounts.email_key(email))
    response.headers.update(NO_STORE)
    return [user_view(u) for u in (await db.exec(query)).all()]


@router.post("/users/{user_id}/minor", status_code=204, response_class=Response)
async def mark_minor(user_id: UserId, admin: AdminUser, db: DbDep,
                     erasure: ErasureDep) -> Response:
    await erasure.erase_minor(db, await _target(db, user_id), actor_id=admin.id)
    return Response(status_code=204)


@router.post("/users/{user_id}/reactivate", status_code=204, response_class=Response)
async def reactivate(user_id: UserId, admin: AdminUser, db: DbDep, profiles: ProfilesDep,
                     logins: LoginsDep) -> Response:
    await accounts.reactivate(db, profiles, logins, await _target(db, user_id),
                              actor_id=admin.id)
    return Response(status_code=204)


@router.get("/privacy-requests")
async def list_privacy_requests(
    admin: AdminUser, db: DbDep, response: Response,
    status: Annotated[Literal["open", "completed", "rejected"] | None, Query()] = None,
    overdue: bool = False,
) -> list[dict[str, Any]]:
    rows = await privacy_requests.admin_list(db, status=status, overdue=overdue)
    response.headers.update(NO_STORE)
    return [{**privacy_request_view(r), "user_id": r.user_id} for r in rows]


@router.patch("/privacy-requests/{request_id}")
async def close_privacy_request(request_id: Annotated[str, Path(max_length=64)],
                                body: CloseRequestIn, admin: AdminUser, db: DbDep,
                                response: Response) -> dict[str, Any]:
    row = await privacy_requests.close_request(db, request_id, body.status, body.resolution)
    await accounts.audit(db, "privacy_request_closed", user_id=row.user_id, actor_id=admin.id,
                         outcome=body.status)
    response.headers.update(NO_STORE)
    return {**privacy_request_view(row), "user_id": row.user_id}


@router.post("/policy", status_code=201, responses=problem_doc({409: "version_exists"}))
async def new_policy(body: PolicyIn, admin: AdminUser, db: DbDep,
                     policies: PolicyDep) -> dict[str, Any]:
    row = await publish_policy(db, body.version, body.substantial)
    policies.invalidate()
    await accounts.audit(db, "policy_published", actor_id=admin.id, detail=body.version)
    return {"version": row.version, "last_updated": rfc3339(row.published_at),
            "substantial": row.substantial}
