"""Done when (issue 15): real `tessera serve` processes deliver a signed `user.deleted` to a
real receiver, also after the receiver was down for a while and tessera was restarted in
between; the mailing vendor sees the email only after consent and a delete after
withdrawal."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlmodel import col, update

from tessera.stores.models import User
from tests.conftest import PASSWORD, bearer, registered_token
from tests.receivers import Receiver, verify_signature
from tests.servers import session_server_env, tessera_server
from tests.test_events import VENDOR_SECRET


async def wait_for(receiver: Receiver, predicate: Any, wait: float = 30.0) -> list[Any]:
    return await asyncio.to_thread(receiver.wait_for, predicate, wait)


def deleted(user_id: str) -> Any:
    return lambda r: (r.path == "/hook" and r.json()["type"] == "user.deleted"
                      and r.json()["data"] == {"user_id": user_id})


def to_vendor(type_: str, email: str) -> Any:
    return lambda r: r.path == "/vendor" and r.json() == {"type": type_, "email": email}


async def delete_account(http: httpx.AsyncClient) -> dict[str, Any]:
    user, token = await registered_token(http)
    answer = await http.request("DELETE", "/me", json={"password": PASSWORD},
                                headers=bearer(token))
    assert answer.status_code == 204
    return user


async def test_user_deleted_arrives_signed_across_receiver_downtime_and_a_restart(
        app: FastAPI, base_settings: dict[str, Any], tmp_path: Path) -> None:
    receiver = Receiver().start()
    env = session_server_env(base_settings, tmp_path / "data",
                             TESSERA_MAILING_VENDOR_URL=receiver.url + "/vendor",
                             TESSERA_MAILING_VENDOR_SECRET=VENDOR_SECRET)
    try:
        with tessera_server(env, tmp_path / "logs", name="first") as first:
            async with httpx.AsyncClient(base_url=first.url, timeout=10) as http:
                admin_user, admin = await registered_token(http)
                async with app.state.tessera.db_factory() as db:
                    await db.exec(update(User).where(col(User.id) == admin_user["id"])
                                  .values(is_admin=True))
                    await db.commit()
                await app.state.tessera.profiles.invalidate(admin_user["id"])
                http.cookies.clear()
                created = await http.post("/admin/webhooks", headers=bearer(admin), json={
                    "url": receiver.url + "/hook", "events": ["user.deleted", "user.erased"]})
                assert created.status_code == 201, created.text
                hook = created.json()

                # The vendor: nothing before consent, the email after, a delete on withdrawal.
                user, token = await registered_token(http)
                http.cookies.clear()
                await asyncio.sleep(1.0)  # several worker rounds
                assert not [r for r in receiver.received if r.path == "/vendor"]
                await http.put("/me/consents/email_vendor", json={"granted": True},
                               headers=bearer(token))
                [upsert] = await wait_for(receiver, to_vendor("vendor.contact_upsert",
                                                              user["email"]))
                assert verify_signature(VENDOR_SECRET, upsert)
                await http.put("/me/consents/email_vendor", json={"granted": False},
                               headers=bearer(token))
                [gone] = await wait_for(receiver, to_vendor("vendor.contact_delete",
                                                            user["email"]))
                assert verify_signature(VENDOR_SECRET, gone)

                # A deletion reaches the subscriber, signed.
                [got] = await wait_for(receiver, deleted(
                    (await delete_account(http))["id"]))
                assert verify_signature(hook["secret"], got)

                # The receiver goes down; a deletion meanwhile fails and waits.
                receiver.stop()
                later = await delete_account(http)

                async def attempts() -> list[dict[str, Any]]:
                    listed = await http.get(f"/admin/webhooks/{hook['id']}/deliveries",
                                            headers=bearer(admin))
                    return [d for d in listed.json() if d["status"] == "pending"]

                for _ in range(200):
                    failing = await attempts()
                    if failing and failing[0]["attempts"] >= 2:
                        break
                    await asyncio.sleep(0.1)
                assert failing and failing[0]["last_status_code"] is None
        assert first.proc.returncode is not None  # stopped before the receiver is back

        receiver = Receiver(port=receiver.port).start()
        with tessera_server(env, tmp_path / "logs", name="second") as second:
            [got] = await wait_for(receiver, deleted(later["id"]))
            assert verify_signature(hook["secret"], got)
            async with httpx.AsyncClient(base_url=second.url, timeout=10) as http:
                listed = (await http.get(f"/admin/webhooks/{hook['id']}/deliveries",
                                         headers=bearer(admin))).json()
                mine = [d for d in listed if d["event_id"] == got.headers["webhook-id"]]
                for _ in range(50):
                    if mine and mine[0]["status"] == "delivered":
                        break
                    await asyncio.sleep(0.1)
                    listed = (await http.get(f"/admin/webhooks/{hook['id']}/deliveries",
                                             headers=bearer(admin))).json()
                    mine = [d for d in listed if d["event_id"] == got.headers["webhook-id"]]
                assert mine[0]["status"] == "delivered" and mine[0]["attempts"] >= 3
                assert (await http.delete(f"/admin/webhooks/{hook['id']}",
                                          headers=bearer(admin))).status_code == 204
    finally:
        receiver.stop()

