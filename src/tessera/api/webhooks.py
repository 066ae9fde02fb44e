"""/admin/webhooks: subscriptions of the services around tessera to its events (admin only).
Events and how a receiver verifies them: docs/events.md."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import col, delete, select

from tessera.api.deps import AdminUser, CipherDep, DbDep, SettingsDep
from tessera.api.schemas import SafeStr
from tessera.domain import events
from tessera.errors import Problem, problem_doc, problem_responses
from tessera.stores.events import WebhookDelivery, WebhookSubscription
from tessera.timeutil import rfc3339

router = APIRouter(
    prefix="/admin/webhooks", tags=["admin"],
    responses=problem_responses(400, 401, 403, 404, 413, 415, 422, 503),
)

NO_STORE = {"Cache-Control": "no-store"}
WebhookId = Annotated[str, Path(max_length=64)]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: SafeStr = Field(max_length=2048, examples=["https://hooks.example.com/tessera"])
    events: list[str] = Field(min_length=1, max_length=len(events.EVENT_TYPES) + 1,
                              examples=[["user.deleted", "user.erased"]],
                              description="event names (docs/events.md), or `*` for all")
    description: SafeStr | None = Field(default=None, max_length=500)

    @field_validator("events")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value
                   if name != events.ALL_EVENTS and name not in events.EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event names {unknown}; known: "
                             f"{', '.join(events.EVENT_TYPES)} or *")
        return value


def subscription_view(row: WebhookSubscription) -> dict[str, Any]:
    return {"id": row.id, "url": row.url, "events": json.loads(row.events),
            "description": row.description, "created_at": rfc3339(row.created_at)}


def delivery_view(row: WebhookDelivery) -> dict[str, Any]:
    return {"id": row.id, "event_id": row.event_id, "type": row.type, "status": row.status,
            "attempts": row.attempts, "last_status_code": row.last_status_code,
            "last_error": row.last_error, "created_at": rfc3339(row.created_at),
            "next_attempt_at": rfc3339(row.next_attempt_at) if row.status == "pending"
            else None,
            "delivered_at": rfc3339(row.delivered_at) if row.delivered_at else None}


@router.post("", status_code=201, responses=problem_doc({422: "validation_error"}))
async def create_webhook(body: WebhookIn, admin: AdminUser, db: DbDep, settings: SettingsDep,
                         cipher: CipherDep, response: Response) -> dict[str, Any]:
    """The `secret` (`whsec_` + base64) is shown only in this answer."""
    try:
        await events.check_url(body.url, settings.webhook_allowed_hosts)
    except events.UnsafeURL as exc:
        raise Problem("validation_error", f"The webhook URL is refused: {exc}.",
                      extra={"errors": [{"loc": ["body", "url"], "msg": str(exc)}]}) from None
    row, secret = await events.create_subscription(
        db, cipher, url=body.url, events=body.events,
        description=body.description)
    response.headers.update(NO_STORE)
    return {**subscription_view(row), "secret": secret}


@router.get("")
async def list_webhooks(admin: AdminUser, db: DbDep,
                        response: Response) -> list[dict[str, Any]]:
    rows = (await db.exec(select(WebhookSubscription)
                          .order_by(col(WebhookSubscription.created_at)))).all()
    response.headers.update(NO_STORE)
    return [subscription_view(r) for r in rows]


async def _subscription(db: DbDep, webhook_id: str) -> WebhookSubscription:
    row = await db.get(WebhookSubscription, webhook_id)
    if row is None:
        raise Problem("not_found", "No such webhook.")
    return row


@router.delete("/{webhook_id}", status_code=204, response_class=Response,
               responses=problem_doc({404: "not_found"}))
async def delete_webhook(webhook_id: WebhookId, admin: AdminUser, db: DbDep) -> Response:
    row = await _subscription(db, webhook_id)
    await db.exec(delete(WebhookDelivery).where(
        col(WebhookDelivery.subscription_id) == row.id))
    await db.delete(row)
    await db.commit()
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", responses=problem_doc({404: "not_found"}))
async def list_deliveries(webhook_id: WebhookId, admin: AdminUser, db: DbDep,
                          response: Response) -> list[dict[str, Any]]:
    """The latest 100 deliveries, newest first."""
    row = await _subscription(db, webhook_id)
    deliveries = (await db.exec(
        select(WebhookDelivery).where(WebhookDelivery.subscription_id == row.id)
        .order_by(col(WebhookDelivery.created_at).desc(), col(WebhookDelivery.id))
        .limit(100))).all()
    response.headers.update(NO_STORE)
    return [delivery_view(d) for d in deliveries]
