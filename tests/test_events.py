"""Events to the services around tessera (API.md "Events"): webhooks from a durable outbox,
signed per Standard Webhooks, and the mailing vendor connector (P8). Real receivers on
loopback; the in-process app's worker is driven by hand (`EventWorker.run_once`)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from sqlmodel import col, select, update

from tessera.domain import events
from tessera.domain.events import EventWorker, UnsafeURL
from tessera.stores.events import OutboxEvent, VendorMessage, WebhookDelivery
from tessera.stores.keys import KeyCipher
from tessera.stores.models import User, utcnow
from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    client_for,
    login,
    registered_token,
    running_app,
)
from tests.receivers import Receiver, verify_signature


async def make_admin(app: FastAPI, client: Any) -> str:
    user, token = await registered_token(client)
    async with app.state.tessera.db_factory() as db:
        await db.exec(update(User).where(col(User.id) == user["id"]).values(is_admin=True))
        await db.commit()
    await app.state.tessera.profiles.invalidate(user["id"])
    return token


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


@pytest.fixture
async def admin_token(app: FastAPI, client: Any) -> str:
    return await make_admin(app, client)


@pytest.fixture
async def subscription(client: Any, admin_token: str, receiver: Receiver,
                       ) -> AsyncIterator[dict[str, Any]]:
    created = await client.post("/admin/webhooks", headers=bearer(admin_token), json={
        "url": receiver.url + "/hook", "events": ["*"], "description": "test receiver"})
    assert created.status_code == 201, created.text
    yield created.json()
    await client.delete(f"/admin/webhooks/{created.json()['id']}", headers=bearer(admin_token))


async def drive(app: FastAPI, receiver: Receiver, predicate: Any,
                wait: float = 30.0) -> list[Any]:
    """Run the app's worker until the receiver got a matching request."""
    worker: EventWorker = app.state.events
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        await worker.run_once()
        found = [r for r in list(receiver.received) if predicate(r)]
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"nothing arrived; got {receiver.received!r}")
        await asyncio.sleep(0.05)


def of_type(type_: str, user_id: str) -> Any:
    def match(r: Any) -> bool:
        if r.path != "/hook":
            return False
        body = r.json()
        return bool(body["type"] == type_ and body["data"].get("user_id") == user_id)
    return match


async def outbox_types(app: FastAPI, user_id: str) -> list[str]:
    async with app.state.tessera.db_factory() as db:
        rows = (await db.exec(select(OutboxEvent).where(
            col(OutboxEvent.data).contains(user_id)).order_by(col(OutboxEvent.created_at)))).all()
    return [r.type for r in rows]


# --- the admin API -------------------------------------------------------------------------

async def test_webhook_secret_is_shown_once_and_listed_subscriptions_carry_none(
        client: Any, admin_token: str, subscription: dict[str, Any]) -> None:
    secret = subscription["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert subscription["events"] == ["*"] and subscription["url"].endswith("/hook")
    listed = await client.get("/admin/webhooks", headers=bearer(admin_token))
    assert listed.status_code == 200
    mine = [w for w in listed.json() if w["id"] == subscription["id"]]
    assert len(mine) == 1 and "secret" not in mine[0] and secret not in listed.text
    deliveries = await client.get(f"/admin/webhooks/{subscription['id']}/deliveries",
                                  headers=bearer(admin_token))
    assert deliveries.status_code == 200 and deliveries.json() == []


async def test_webhook_creation_refuses_unknown_events_and_unsafe_urls(
        client: Any, admin_token: str, receiver: Receiver) -> None:
    async def create(url: str, names: list[str]) -> Any:
        return await client.post("/admin/webhooks", headers=bearer(admin_token),
                                 json={"url": url, "events": names})

    assert_problem(await create(receiver.url, ["user.exploded"]), 422, "validation_error")
    assert_problem(await create(receiver.url, []), 422, "validation_error")
    for url in ("http://hooks.example.com/x",      # plain http, not an allowed host
                "https://localhost/x",             # resolves to loopback
                "https://127.0.0.2/x", "https://10.1.2.3/x", "https://169.254.169.254/x",
                "https://[::1]/x", "https://[::ffff:127.0.0.1]/x", "https://100.64.0.1/x",
                "ftp://127.0.0.1/x", "https://user:pw@127.0.0.1/x", "not a url"):
        assert_problem(await create(url, ["user.deleted"]), 422, "validation_error")
    user, token = await registered_token(client)
    assert_problem(await client.post("/admin/webhooks", headers=bearer(token),
                                     json={"url": receiver.url, "events": ["*"]}),
                   403, "forbidden")
    assert_problem(await client.delete("/admin/webhooks/nope", headers=bearer(admin_token)),
                   404, "not_found")
    assert_problem(await client.get("/admin/webhooks/nope/deliveries",
                                    headers=bearer(admin_token)), 404, "not_found")


async def test_the_guard_checks_again_at_delivery_and_pins_the_checked_address() -> None:
    assert await events.pinned_request("http://127.0.0.1:9/x", ["127.0.0.1"]) == (
        "http://127.0.0.1:9/x", {}, {})
    with pytest.raises(UnsafeURL):
        await events.pinned_request("https://127.0.0.1/x", [])
    with pytest.raises(UnsafeURL):
        await events.pinned_request("http://127.0.0.1/x", [])
    url, headers, extensions = await events.pinned_request("https://1.1.1.1:8443/x?a=1", [])
    assert url == "https://1.1.1.1:8443/x?a=1" and headers == {"Host": "1.1.1.1:8443"}
    assert extensions == {"sni_hostname": "1.1.1.1"}


# --- delivery ------------------------------------------------------------------------------

async def test_a_deleted_user_reaches_a_subscriber_as_a_signed_user_deleted(
        app: FastAPI, client: Any, admin_token: str, subscription: dict[str, Any],
        receiver: Receiver) -> None:
    user, token = await registered_token(client)
    deleted = await client.request("DELETE", "/me", json={"password": PASSWORD},
                                   headers=bearer(token))
    assert deleted.status_code == 204
    [got] = await drive(app, receiver, of_type("user.deleted", user["id"]))
    assert verify_signature(subscription["secret"], got)
    assert not verify_signature("whsec_" + base64.b64encode(b"x" * 32).decode(), got)
    # ... and with the maintained library docs/events.md shows.
    from standardwebhooks.webhooks import Webhook

    assert Webhook(subscription["secret"]).verify(got.body, got.headers)["type"] == "user.deleted"
    body = got.json()
    assert body["data"] == {"user_id": user["id"]}
    assert user["email"] not in got.body.decode() and set(body) == {"type", "timestamp", "data"}
    assert got.headers["webhook-id"].startswith("evt_")
    # Its earlier events were dropped with the account: only the deletion notice went out.
    assert not [r for r in receiver.received if of_type("user.created", user["id"])(r)]
    listed = (await client.get(f"/admin/webhooks/{subscription['id']}/deliveries",
                               headers=bearer(admin_token))).json()
    mine = [d for d in listed if d["event_id"] == got.headers["webhook-id"]]
    assert mine[0]["status"] == "delivered" and mine[0]["attempts"] == 1
    assert mine[0]["last_status_code"] == 200 and mine[0]["type"] == "user.deleted"


async def test_a_failing_receiver_is_retried_and_redirects_are_not_followed(
        app: FastAPI, client: Any, admin_token: str, subscription: dict[str, Any],
        receiver: Receiver) -> None:
    receiver.status, receiver.location = 302, receiver.url + "/elsewhere"
    user, token = await registered_token(client)
    await drive(app, receiver, of_type("user.created", user["id"]))

    async def mine() -> dict[str, Any]:
        listed = (await client.get(f"/admin/webhooks/{subscription['id']}/deliveries",
                                   headers=bearer(admin_token))).json()
        return next(d for d in listed if d["type"] == "user.created")

    first = await mine()
    assert first["status"] == "pending" and first["attempts"] == 1
    assert first["last_status_code"] == 302 and first["next_attempt_at"] is not None
    receiver.status, receiver.location = 500, None
    await drive(app, receiver, lambda r: len([x for x in receiver.received
                                              if of_type("user.created", user["id"])(x)]) >= 2)
    receiver.status = 200
    await drive(app, receiver, lambda r: len([x for x in receiver.received
                                              if of_type("user.created", user["id"])(x)]) >= 3)
    got = [r for r in receiver.received if of_type("user.created", user["id"])(r)]
    assert all(verify_signature(subscription["secret"], r) for r in got)
    assert len({r.headers["webhook-id"] for r in got}) == 1  # one message, retried
    assert not any(r.path == "/elsewhere" for r in receiver.received)
    done = await mine()
    assert done["status"] == "delivered" and done["attempts"] == 3


async def test_a_delivery_failing_for_longer_than_the_retry_window_is_marked_failed(
        app: FastAPI, client: Any, admin_token: str, subscription: dict[str, Any],
        receiver: Receiver) -> None:
    receiver.status = 503
    user, _ = await registered_token(client)
    await drive(app, receiver, of_type("user.created", user["id"]))
    async with app.state.tessera.db_factory() as db:
        await db.exec(update(WebhookDelivery).where(
            WebhookDelivery.subscription_id == subscription["id"]).values(
            created_at=utcnow() - timedelta(hours=27), next_attempt_at=utcnow()))
        await db.commit()
    await drive(app, receiver, lambda r: len([x for x in receiver.received if of_type(
        "user.created", user["id"])(x)]) >= 2)
    listed = (await client.get(f"/admin/webhooks/{subscription['id']}/deliveries",
                               headers=bearer(admin_token))).json()
    assert [(d["status"], d["last_status_code"], d["next_attempt_at"]) for d in listed] == [
        ("failed", 503, None)]
    count = len(receiver.received)
    for _ in range(3):
        await app.state.events.run_once()
    assert len(receiver.received) == count  # given up


async def test_two_instances_never_send_one_delivery_at_once_and_a_dead_ones_lease_expires(
        app: FastAPI, client: Any, subscription: dict[str, Any], receiver: Receiver) -> None:
    t = app.state.tessera
    workers = [EventWorker(t.db_factory, t.settings, KeyCipher(t.secret)) for _ in range(3)]
    try:
        user, _ = await registered_token(client)
        while await workers[0].fan_out():
            pass
        await asyncio.gather(*(w.run_once() for w in workers))
        await asyncio.gather(*(w.run_once() for w in workers))
        assert len([r for r in receiver.received
                    if of_type("user.created", user["id"])(r)]) == 1

        # An instance that claimed a delivery and died: its lease runs out, then it is sent.
        other, _ = await registered_token(client)
        while await workers[0].fan_out():
            pass
        async with t.db_factory() as db:
            row = (await db.exec(select(WebhookDelivery).where(
                WebhookDelivery.subscription_id == subscription["id"],
                WebhookDelivery.type == "user.created", WebhookDelivery.status == "pending",
            ))).all()
            [delivery] = [d for d in row if other["id"] in
                          (await db.get(OutboxEvent, d.event_id)).data]  # type: ignore[union-attr]
            await db.exec(update(WebhookDelivery).where(col(WebhookDelivery.id) == delivery.id)
                          .values(claimed_by="dead", claimed_until=utcnow() + timedelta(hours=1)))
            await db.commit()
        await workers[1].run_once()
        assert not [r for r in receiver.received if of_type("user.created", other["id"])(r)]
        async with t.db_factory() as db:
            await db.exec(update(WebhookDelivery).where(col(WebhookDelivery.id) == delivery.id)
                          .values(claimed_until=utcnow() - timedelta(seconds=1)))
            await db.commit()
        await workers[1].run_once()
        assert len([r for r in receiver.received
                    if of_type("user.created", other["id"])(r)]) == 1
    finally:
        for worker in workers:
            await worker.stop()


async def test_each_change_queues_its_event_in_its_own_transaction(
        app: FastAPI, client: Any, admin_token: str) -> None:
    user, token = await registered_token(client)
    uid = user["id"]
    assert await outbox_types(app, uid) == ["user.created"]
    wrong = await client.post("/me/password", headers=bearer(token), json={
        "current_password": "wrong password", "new_password": "another good password"})
    assert wrong.status_code == 403
    assert await outbox_types(app, uid) == ["user.created"]  # nothing for a refused change
    assert (await client.post("/me/password", headers=bearer(token), json={
        "current_password": PASSWORD, "new_password": PASSWORD + "!"})).status_code == 204
    assert (await client.put("/me/consents/analytics", json={"granted": True},
                             headers=bearer(token))).status_code == 200
    assert (await client.put("/me/restrictions", headers=bearer(token), json={
        "restrict_processing": False, "object_to_processing": True})).status_code == 200
    assert (await client.post("/auth/logout", headers=bearer(token))).status_code == 204
    token = (await login(client, user["email"], PASSWORD + "!")).json()["access_token"]
    assert (await client.post("/auth/logout-all", headers=bearer(token))).status_code == 204
    # Logouts queue their event with their audit row, written off the request path within
    # the flush interval (stores/audit.py), in one transaction.
    await app.state.tessera.audit_trail.flush()
    token = (await login(client, user["email"], PASSWORD + "!")).json()["access_token"]
    assert (await client.post("/me/deactivate", headers=bearer(token))).status_code == 204
    assert (await client.post(f"/admin/users/{uid}/reactivate",
                              headers=bearer(admin_token))).status_code == 204
    assert (await client.post(f"/admin/users/{uid}/minor",
                              headers=bearer(admin_token))).status_code == 204
    assert await outbox_types(app, uid) == [
        "user.created", "user.password_changed", "consent.changed", "restriction.changed",
        "session.revoked", "session.revoked", "user.deactivated", "user.reactivated",
        "user.erased"]
    async with app.state.tessera.db_factory() as db:
        rows = (await db.exec(select(OutboxEvent).where(
            col(OutboxEvent.data).contains(uid)))).all()
    data = {r.type: json.loads(r.data) for r in rows}
    assert data["consent.changed"] == {"user_id": uid, "purpose": "analytics", "granted": True}
    assert data["restriction.changed"] == {"user_id": uid, "restrict_processing": False,
                                           "object_to_processing": True}
    assert all("@" not in r.data for r in rows)  # ids, never an email


# --- the mailing vendor (P8) ---------------------------------------------------------------

VENDOR_SECRET = "whsec_" + base64.b64encode(b"v" * 32).decode()


@pytest.fixture
async def vendor_app(base_settings: dict[str, Any], receiver: Receiver,
                     ) -> AsyncIterator[FastAPI]:
    async with running_app(**base_settings, mailing_vendor_url=receiver.url + "/vendor",
                           mailing_vendor_secret=VENDOR_SECRET) as application:
        yield application


def to_vendor(type_: str, email: str) -> Any:
    return lambda r: r.path == "/vendor" and r.json() == {"type": type_, "email": email}


async def test_the_vendor_gets_the_email_only_after_consent_and_a_delete_after_withdrawal(
        vendor_app: FastAPI, receiver: Receiver) -> None:
    async with client_for(vendor_app) as client:
        user, token = await registered_token(client)
        email = user["email"]
        for _ in range(3):
            await vendor_app.state.events.run_once()
        assert not [r for r in receiver.received if r.path == "/vendor"]
        await client.put("/me/consents/analytics", json={"granted": True}, headers=bearer(token))
        await vendor_app.state.events.run_once()
        assert not [r for r in receiver.received if r.path == "/vendor"]

        await client.put("/me/consents/email_vendor", json={"granted": True},
                         headers=bearer(token))
        [upsert] = await drive(vendor_app, receiver, to_vendor("vendor.contact_upsert", email))
        assert verify_signature(VENDOR_SECRET, upsert)
        await client.put("/me/consents/email_vendor", json={"granted": False},
                         headers=bearer(token))
        [gone] = await drive(vendor_app, receiver, to_vendor("vendor.contact_delete", email))
        assert verify_signature(VENDOR_SECRET, gone)
        assert receiver.received.index(upsert) < receiver.received.index(gone)
        export = (await client.get("/me/export", headers=bearer(token))).json()
        assert [(d["recipient"], d["fields"]) for d in export["disclosures"]] == [
            ("mailing_vendor", ["email"]), ("mailing_vendor", ["email"])]
        assert all(d["at"].endswith("Z") for d in export["disclosures"])

        # Consent again, then the account is deleted: the vendor is told to delete it, and
        # nothing of the user (email, disclosures) stays in tessera once it was delivered.
        await client.put("/me/consents/email_vendor", json={"granted": True},
                         headers=bearer(token))
        await drive(vendor_app, receiver,
                    lambda r: len([x for x in receiver.received if to_vendor(
                        "vendor.contact_upsert", email)(x)]) == 2)
        assert (await client.request("DELETE", "/me", json={"password": PASSWORD},
                                     headers=bearer(token))).status_code == 204
        await drive(vendor_app, receiver,
                    lambda r: len([x for x in receiver.received if to_vendor(
                        "vendor.contact_delete", email)(x)]) == 2)
        async with vendor_app.state.tessera.db_factory() as db:
            assert (await db.exec(select(VendorMessage).where(
                VendorMessage.user_id == user["id"]))).all() == []


async def test_an_email_change_deletes_the_old_address_at_the_vendor_and_upserts_the_new(
        vendor_app: FastAPI, receiver: Receiver, smtp: Any) -> None:
    async with client_for(vendor_app) as client:
        user, token = await registered_token(client)
        await client.put("/me/consents/email_vendor", json={"granted": True},
                         headers=bearer(token))
        new = "renamed-" + user["email"]
        asked = await client.patch("/me", json={"email": new, "current_password": PASSWORD},
                                   headers=bearer(token))
        assert asked.status_code == 202, asked.text
        confirm = (await smtp.wait_for(new, "email_change"))[0]  # the change is confirmed
        changed = await client.post("/me/email/confirm", json={"token": confirm.token})
        assert changed.status_code == 200, changed.text
        await drive(vendor_app, receiver, to_vendor("vendor.contact_upsert", new))
        order = [(r.json()["type"], r.json()["email"]) for r in receiver.received
                 if r.path == "/vendor" and r.json()["email"] in (user["email"], new)]
        assert order == [("vendor.contact_upsert", user["email"]),
                         ("vendor.contact_delete", user["email"]),
                         ("vendor.contact_upsert", new)]


async def test_an_erased_minor_is_deleted_at_the_vendor_and_queued_upserts_never_leave(
        vendor_app: FastAPI, receiver: Receiver) -> None:
    async with client_for(vendor_app) as client:
        admin = await make_admin(vendor_app, client)
        user, token = await registered_token(client)
        await client.put("/me/consents/email_vendor", json={"granted": True},
                         headers=bearer(token))
        # Erased before the worker ran: the queued upsert is dropped, a delete goes out.
        assert (await client.post(f"/admin/users/{user['id']}/minor",
                                  headers=bearer(admin))).status_code == 204
        await drive(vendor_app, receiver, to_vendor("vendor.contact_delete", user["email"]))
        assert not [r for r in receiver.received
                    if to_vendor("vendor.contact_upsert", user["email"])(r)]
