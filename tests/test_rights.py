"""P4-P10 end to end through HTTP: rights, consents, usage log, requests, minors, policy."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text, update

from tessera.stores.models import PrivacyRequest, User
from tests.conftest import (
    PASSWORD,
    SERVICE_KEY,
    assert_problem,
    bearer,
    client_for,
    login,
    new_email,
    register,
    registered_token,
)


async def make_admin(app: FastAPI, client) -> str:
    user, token = await registered_token(client)
    async with app.state.tessera.db_factory() as db:
        await db.exec(update(User).where(User.id == user["id"]).values(is_admin=True))
        await db.commit()
    return token


async def flush_usage(app: FastAPI) -> None:
    await app.state.tessera.usage.flush()


# --- P5: access, rectify, password, deactivate ------------------------------------------

async def test_patch_me_changes_email_and_refuses_a_taken_one(client, smtp) -> None:
    user, token = await registered_token(client)
    other = await register(client)
    new = new_email("renamed")
    asked = await client.patch("/me", json={"email": new, "current_password": PASSWORD},
                               headers=bearer(token))
    assert asked.status_code == 202 and asked.json()["email"] == user["email"]
    assert asked.json()["pending_email"] == new
    confirm = (await smtp.wait_for(new, "email_change"))[0]
    changed = await client.post("/me/email/confirm", json={"token": confirm.token})
    assert changed.status_code == 200 and changed.json()["email"] == new
    same = await client.patch("/me", json={"email": new.upper(), "current_password": PASSWORD},
                              headers=bearer(token))
    assert same.status_code == 200 and same.json()["email"] == new
    assert_problem(await client.patch("/me", json={"email": other["email"],
                                                   "current_password": PASSWORD},
                                      headers=bearer(token)), 409, "email_taken")
    assert (await login(client, new)).status_code == 200
    assert_problem(await login(client, user["email"]), 401, "invalid_credentials")


async def test_password_change_ends_other_sessions(client) -> None:
    user, token = await registered_token(client)
    other = (await login(client, user["email"])).json()["access_token"]
    wrong = await client.post("/me/password", headers=bearer(token),
                              json={"current_password": "not it at all", "new_password": "x" * 12})
    assert_problem(wrong, 403, "invalid_credentials")
    ok = await client.post("/me/password", headers=bearer(token),
                           json={"current_password": PASSWORD, "new_password": "a new passphrase"})
    assert ok.status_code == 204
    assert (await client.get("/me", headers=bearer(token))).status_code == 200
    assert_problem(await client.get("/me", headers=bearer(other)), 401, "not_authenticated")
    assert (await login(client, user["email"], "a new passphrase")).status_code == 200
    assert_problem(await login(client, user["email"]), 401, "invalid_credentials")


async def test_deactivate_then_login_is_inactive_until_reactivated(app: FastAPI, client) -> None:
    user, token = await registered_token(client)
    assert (await client.post("/me/deactivate", headers=bearer(token))).status_code == 204
    assert_problem(await client.get("/me", headers=bearer(token)), 401, "not_authenticated")
    assert_problem(await login(client, user["email"]), 403, "account_inactive")
    admin = await make_admin(app, client)
    reactivated = await client.post(f"/admin/users/{user['id']}/reactivate",
                                    headers=bearer(admin))
    assert reactivated.status_code == 204
    assert (await login(client, user["email"])).status_code == 200


# --- P8: consents ------------------------------------------------------------------------

async def test_consents_start_withdrawn_and_keep_history(client) -> None:
    _, token = await registered_token(client)
    purposes = (await client.get("/me/consents", headers=bearer(token))).json()["purposes"]
    assert set(purposes) == {"email_vendor", "analytics"}
    assert all(p["granted"] is False for p in purposes.values())
    granted = await client.put("/me/consents/email_vendor", json={"granted": True},
                               headers=bearer(token))
    assert granted.status_code == 200
    assert granted.json()["purposes"]["email_vendor"]["granted"] is True
    await client.put("/me/consents/email_vendor", json={"granted": False}, headers=bearer(token))
    assert_problem(await client.put("/me/consents/telemetry", json={"granted": True},
                                    headers=bearer(token)), 404, "not_found")
    assert_problem(await client.put("/me/consents/analytics", json={"granted": "yes"},
                                    headers=bearer(token)), 422, "validation_error")
    export = (await client.get("/me/export", headers=bearer(token))).json()
    history = [(e["purpose"], e["granted"]) for e in export["consents"]["history"]]
    assert history == [("email_vendor", True), ("email_vendor", False)]


async def test_nothing_reaches_the_mailing_vendor_without_consent(app: FastAPI, client) -> None:
    """The connector's one entry point refuses without consent (test_events.py sends)."""
    from tessera.domain.consents import hand_over_to_mailing_vendor
    from tessera.errors import Problem

    user, _ = await registered_token(client)
    async with app.state.tessera.db_factory() as db:
        row = await db.get(User, user["id"])
        with pytest.raises(Problem) as refused:
            hand_over_to_mailing_vendor(db, app.state.tessera.settings, row, consented=False)
        assert refused.value.code == "consent_required"


# --- P4: usage log -----------------------------------------------------------------------

async def test_usage_log_records_requests_and_shows_them_in_the_export(app: FastAPI) -> None:
    async with client_for(app, ip="203.0.113.7") as client:
        _, token = await registered_token(client)
        await client.get("/me", headers=bearer(token))
        await client.get("/me/consents", headers=bearer(token))
        await asyncio.sleep(0.5)  # the flusher writes in the background
        usage = (await client.get("/me/export", headers=bearer(token))).json()["usage_log"]
    paths = [e["path"] for e in usage]
    assert "/me" in paths and "/me/consents" in paths
    event = next(e for e in usage if e["path"] == "/me/consents")
    assert event["ip"] == "203.0.113.7" and event["method"] == "GET"
    assert event["host"] == "testserver" and event["status"] == 200 and event["bytes"] > 0
    assert event["at"].endswith("Z")


async def test_no_usage_logged_under_dnt_gpc_or_restriction(app: FastAPI, client) -> None:
    _, token = await registered_token(client)
    await client.get("/me", headers={**bearer(token), "DNT": "1"})
    await client.get("/me/consents", headers={**bearer(token), "Sec-GPC": "1"})
    await flush_usage(app)
    assert (await client.get("/me/export", headers=bearer(token))).json()["usage_log"] == []

    restricted = await client.put("/me/restrictions", headers=bearer(token),
                                  json={"restrict_processing": True, "object_to_processing": False})
    assert restricted.json() == {"restrict_processing": True, "object_to_processing": False}
    response = await client.get("/me/consents", headers=bearer(token))
    assert response.headers["tk"] == "N"
    assert "visitor" not in response.headers.get("set-cookie", "")
    await flush_usage(app)
    logged = (await client.get("/me/export", headers=bearer(token))).json()["usage_log"]
    assert all(e["path"] != "/me/consents" for e in logged), logged


async def test_purge_deletes_usage_past_retention(app: FastAPI, client) -> None:
    from tessera.stores.usage import purge_usage

    _, token = await registered_token(client)
    dnt = {**bearer(token), "DNT": "1"}  # reading the export under DNT logs nothing new
    await client.get("/me", headers=bearer(token))
    await flush_usage(app)
    async with app.state.tessera.db_factory() as db:
        await purge_usage(db, 90)  # today's events are within 90 days
    assert [e["path"] for e in (await client.get("/me/export", headers=dnt)).json()["usage_log"]
            ] == ["/me"]
    async with app.state.tessera.db_factory() as db:
        assert await purge_usage(db, 0) >= 1
    assert (await client.get("/me/export", headers=dnt)).json()["usage_log"] == []


# --- P6: privacy requests ----------------------------------------------------------------

def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def test_privacy_requests_carry_legal_due_dates(client) -> None:
    from tessera.domain.privacy_requests import add_business_days

    _, token = await registered_token(client)
    cn = await client.post("/me/privacy-requests", headers=bearer(token),
                           json={"kind": "access", "region": "cn", "message": "copy please"})
    assert cn.status_code == 201
    body = cn.json()
    assert body["status"] == "open" and body["region"] == "CN"
    created, due = parse(body["created_at"]), parse(body["due_at"])
    assert due == add_business_days(created, 15)
    assert due.time() == created.time() and due.weekday() < 5
    assert 19 <= (due - created).days <= 21
    de = (await client.post("/me/privacy-requests", headers=bearer(token),
                            json={"kind": "delete", "region": "DE"})).json()
    assert parse(de["due_at"]) - parse(de["created_at"]) == timedelta(days=30)
    for bad in ({"kind": "erase", "region": "DE"}, {"kind": "access", "region": "XX"},
                {"kind": "access", "region": "Germany"}, {"kind": "access"}):
        assert_problem(await client.post("/me/privacy-requests", headers=bearer(token), json=bad),
                       422, "validation_error")
    mine = (await client.get("/me/privacy-requests", headers=bearer(token))).json()
    assert [r["id"] for r in mine] == [body["id"], de["id"]]


def test_business_days_skip_weekends() -> None:
    from tessera.domain.privacy_requests import add_business_days

    friday = datetime(2026, 11, 27, 16, 30, tzinfo=UTC)
    assert add_business_days(friday, 1) == datetime(2026, 11, 30, 16, 30, tzinfo=UTC)
    assert add_business_days(friday, 15) == datetime(2026, 12, 18, 16, 30, tzinfo=UTC)
    saturday = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
    assert add_business_days(saturday, 1) == datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


async def test_admin_lists_requests_oldest_due_first_and_closes_them(app: FastAPI, client) -> None:
    admin = await make_admin(app, client)
    _, token = await registered_token(client)
    late = (await client.post("/me/privacy-requests", headers=bearer(token),
                              json={"kind": "object", "region": "FR"})).json()
    soon = (await client.post("/me/privacy-requests", headers=bearer(token),
                              json={"kind": "confirm", "region": "CN"})).json()
    async with app.state.tessera.db_factory() as db:  # make one overdue
        await db.exec(update(PrivacyRequest).where(PrivacyRequest.id == late["id"])
                      .values(due_at=datetime.now(UTC) - timedelta(days=1)))
        await db.commit()
    listed = (await client.get("/admin/privacy-requests", headers=bearer(admin))).json()
    dues = [parse(r["due_at"]) for r in listed]
    assert dues == sorted(dues)
    overdue = (await client.get("/admin/privacy-requests", params={"overdue": "true"},
                                headers=bearer(admin))).json()
    assert late["id"] in [r["id"] for r in overdue] and soon["id"] not in [r["id"] for r in overdue]
    closed = await client.patch(f"/admin/privacy-requests/{late['id']}", headers=bearer(admin),
                                json={"status": "completed", "resolution": "objection honoured"})
    assert closed.status_code == 200 and closed.json()["status"] == "completed"
    assert_problem(await client.patch(f"/admin/privacy-requests/{late['id']}",
                                      headers=bearer(admin), json={"status": "open"}),
                   422, "validation_error")
    still = (await client.get("/admin/privacy-requests", params={"overdue": "true"},
                              headers=bearer(admin))).json()
    assert late["id"] not in [r["id"] for r in still]
    assert_problem(await client.get("/admin/privacy-requests", headers=bearer(token)),
                   403, "forbidden")


# --- P7: minors --------------------------------------------------------------------------

async def test_admin_marks_a_minor_deactivated_and_erased(app: FastAPI, client) -> None:
    admin = await make_admin(app, client)
    user, token = await registered_token(client)
    await client.put("/me/consents/analytics", json={"granted": True}, headers=bearer(token))
    marked = await client.post(f"/admin/users/{user['id']}/minor", headers=bearer(admin))
    assert marked.status_code == 204
    assert_problem(await client.get("/me", headers=bearer(token)), 401, "not_authenticated")
    assert_problem(await login(client, user["email"]), 401, "invalid_credentials")
    found = await client.get("/admin/users", params={"email": user["email"]},
                             headers=bearer(admin))
    assert found.json() == []
    assert_problem(await client.post("/admin/users/nope/minor", headers=bearer(admin)),
                   404, "not_found")


# --- P10: policy versions ----------------------------------------------------------------

async def test_registration_without_policy_version_records_no_acceptance(client) -> None:
    """Changes to v1: consent is never inferred (P10). Without policy_version the account has
    accepted nothing, and the gate asks until POST /me/policy-consent."""
    user = await register(client, policy_version=None)
    token = (await login(client, user["email"])).json()["access_token"]
    me = (await client.get("/me", headers=bearer(token))).json()
    assert me["policy_version"] is None
    export = (await client.get("/me/export", headers=bearer(token))).json()
    assert export["account"]["policy_accepted_at"] is None
    for method, path in (("GET", "/me/consents"), ("GET", "/auth/sessions")):
        assert_problem(await client.request(method, path, headers=bearer(token)), 403,
                       "policy_consent_required")
    introspected = await client.post("/auth/introspect", data={"token": token},
                                     headers=bearer(SERVICE_KEY))
    assert introspected.json()["policy_accepted"] is False

    version = (await client.get("/policy")).json()["version"]
    accepted = await client.post("/me/policy-consent", json={"version": version},
                                 headers=bearer(token))
    assert accepted.status_code == 204
    assert (await client.get("/me/consents", headers=bearer(token))).status_code == 200
    assert (await client.get("/me", headers=bearer(token))).json()["policy_version"] == version
    introspected = await client.post("/auth/introspect", data={"token": token},
                                     headers=bearer(SERVICE_KEY))
    assert introspected.json()["policy_accepted"] is True

    # With the current version sent, the acceptance is recorded at registration.
    other = await register(client)  # conftest sends the current version
    other_token = (await login(client, other["email"])).json()["access_token"]
    assert (await client.get("/me", headers=bearer(other_token))).json()["policy_version"] \
        == version
    assert (await client.get("/me/consents", headers=bearer(other_token))).status_code == 200


async def test_substantial_policy_change_needs_fresh_consent(app: FastAPI, client) -> None:
    admin = await make_admin(app, client)
    user, token = await registered_token(client)
    for _ in range(2):  # the answer is memoised now (api/lean.py): it must not outlive the policy
        before = await client.post("/auth/introspect", data={"token": token},
                                   headers=bearer(SERVICE_KEY))
        assert before.json()["policy_accepted"] is True
    minor = await client.post("/admin/policy", headers=bearer(admin),
                              json={"version": "minor-" + new_email()[:12], "substantial": False})
    assert minor.status_code == 201
    assert (await client.get("/me/consents", headers=bearer(token))).status_code == 200

    version = "v-" + new_email()[:16]
    published = await client.post("/admin/policy", headers=bearer(admin),
                                  json={"version": version, "substantial": True})
    assert published.status_code == 201
    assert (await client.get("/policy")).json()["version"] == version
    for method, path in (("GET", "/me/consents"), ("GET", "/auth/sessions"),
                         ("PATCH", "/me"), ("GET", "/admin/users")):
        kwargs: dict[str, Any] = ({"json": {"email": new_email(), "current_password": PASSWORD}}
                                  if method == "PATCH" else {})
        gated = await client.request(method, path, headers=bearer(admin if "admin" in path
                                                                   else token), **kwargs)
        assert_problem(gated, 403, "policy_consent_required")
    assert (await client.get("/me", headers=bearer(token))).status_code == 200
    assert (await client.get("/me/export", headers=bearer(token))).status_code == 200
    introspected = await client.post("/auth/introspect", data={"token": token},
                                     headers=bearer(SERVICE_KEY))
    assert introspected.json()["policy_accepted"] is False

    assert_problem(await client.post("/me/policy-consent", json={"version": "old"},
                                     headers=bearer(token)), 409, "policy_outdated")
    ok = await client.post("/me/policy-consent", json={"version": version}, headers=bearer(token))
    assert ok.status_code == 204
    assert (await client.get("/me/consents", headers=bearer(token))).status_code == 200
    assert (await client.get("/me", headers=bearer(token))).json()["policy_version"] == version
    introspected = await client.post("/auth/introspect", data={"token": token},
                                     headers=bearer(SERVICE_KEY))
    assert introspected.json()["policy_accepted"] is True
    # Admins are gated too, until they accept.
    assert (await client.post("/me/policy-consent", json={"version": version},
                              headers=bearer(admin))).status_code == 204
    assert_problem(await client.post("/admin/policy", headers=bearer(admin),
                                     json={"version": version, "substantial": True}),
                   409, "version_exists")


async def test_non_admin_gets_forbidden(client) -> None:
    _, token = await registered_token(client)
    for method, path in (("GET", "/admin/users"), ("POST", "/admin/policy")):
        response = await client.request(method, path, headers=bearer(token),
                                        json={"version": "x", "substantial": True})
        assert_problem(response, 403, "forbidden")


# --- P5 export + P9 deletion ---------------------------------------------------------------

async def test_export_holds_every_category_and_nothing_of_another_user(app: FastAPI) -> None:
    async with client_for(app, ip="198.51.100.4") as client:
        other, other_token = await registered_token(client)
        await client.put("/me/consents/analytics", json={"granted": True},
                         headers=bearer(other_token))
        await client.post("/me/privacy-requests", headers=bearer(other_token),
                          json={"kind": "access", "region": "US", "message": "other-secret"})
        user, token = await registered_token(client)
        await client.put("/me/consents/email_vendor", json={"granted": True},
                         headers=bearer(token))
        await client.put("/me/restrictions", headers=bearer(token),
                         json={"restrict_processing": False, "object_to_processing": False})
        await client.post("/me/privacy-requests", headers=bearer(token),
                          json={"kind": "portability", "region": "JP"})
        await client.get("/auth/sessions", headers=bearer(token))
        response = await client.get("/me/export", headers=bearer(token))
    assert response.status_code == 200
    assert response.headers["content-disposition"].startswith("attachment")
    assert response.headers["cache-control"] == "no-store"
    doc = response.json()
    for category in ("account", "consents", "restrictions", "sessions", "usage_log",
                     "privacy_requests", "security_events"):
        assert category in doc, category
    assert doc["account"]["email"] == user["email"]
    assert doc["consents"]["current"]["email_vendor"]["granted"] is True
    assert doc["privacy_requests"][0]["kind"] == "portability"
    assert len(doc["sessions"]) == 1
    assert any(e["path"] == "/auth/sessions" for e in doc["usage_log"])
    assert any(e["event"] == "login" for e in doc["security_events"])
    raw = json.dumps(doc)
    for foreign in (other["id"], other["email"], "other-secret"):
        assert foreign not in raw


async def test_delete_me_leaves_nothing_personal_behind(app: FastAPI, client, smtp) -> None:
    user, token = await registered_token(client)
    second = (await login(client, user["email"])).json()["access_token"]
    await client.put("/me/consents/email_vendor", json={"granted": True}, headers=bearer(token))
    await client.post("/me/privacy-requests", headers=bearer(token),
                      json={"kind": "delete", "region": "BR"})
    await client.get("/me", headers=bearer(token))
    await flush_usage(app)
    assert_problem(await client.request("DELETE", "/me", json={"password": "wrong password"},
                                        headers=bearer(token)), 403, "invalid_credentials")
    deleted = await client.request("DELETE", "/me", json={"password": PASSWORD},
                                   headers=bearer(token))
    assert deleted.status_code == 204
    for t in (token, second):
        assert_problem(await client.get("/me", headers=bearer(t)), 401, "not_authenticated")
    await flush_usage(app)
    # The one thing kept a moment: the account-deleted notice, until it is sent (then gone).
    await smtp.wait_for(user["email"], "account_deleted")
    t = app.state.tessera
    for _ in range(100):
        async with t.db_factory() as db:
            left = (await db.exec(text("SELECT count(*) FROM mail_outbox WHERE to_addr = :a"),
                                  params={"a": user["email"]})).one()[0]
        if not left:
            break
        await asyncio.sleep(0.05)

    needles = (user["id"], user["email"], user["email"].lower())
    async with t.engine.connect() as conn:
        tables = [r[0] for r in (await conn.execute(text(
            "SELECT name FROM sqlite_master WHERE type='table'" if t.engine.dialect.name == "sqlite"
            else "SELECT tablename FROM pg_tables WHERE schemaname='public'"))).all()]
        for table in tables:
            rows = (await conn.execute(text(f'SELECT * FROM "{table}"'))).all()
            if table == "event_outbox":  # the deletion notice carries the id until delivered
                rows = [r for r in rows if r.type != "user.deleted"]
            dump = json.dumps([list(map(str, r)) for r in rows])
            for needle in needles:
                assert needle not in dump, f"{needle} left in table {table}"
    async for key in t.redis.scan_iter(match="*", count=1000):
        if key == f"tessera:{{{user['id']}}}:epoch":
            # The auth epoch (a bare counter) outlives the account for at most a day, so a
            # login in flight still gets no session (issue 12.1, docs/security.md).
            assert (await t.redis.get(key)).isdigit()
            assert 0 < await t.redis.ttl(key) <= 86400
            continue
        assert all(n not in key for n in needles), key
        if await t.redis.type(key) == "string":
            value = await t.redis.get(key)
            assert all(n not in value for n in needles), key
    again = await client.post("/auth/register", json={"email": user["email"],
                                                       "password": PASSWORD, "is_adult": True})
    assert again.status_code == 201
