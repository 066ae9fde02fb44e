"""Attack, faults, and headers: brute force backs off, Redis down fails closed, audit trail."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlmodel import col, select

from tessera.ops.embedded import redis_server_binary
from tessera.stores.models import AuditEvent
from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    client_for,
    login,
    new_email,
    register,
    registered_token,
    running_app,
)


def random_ip() -> str:
    return f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


# --- brute force ---------------------------------------------------------------------------

async def test_failed_logins_per_account_back_off_with_retry_after(base_settings) -> None:
    limits = {**base_settings, "login_max_failures_per_account": 3,
              "login_failure_window_seconds": 2}
    async with running_app(**limits) as app, client_for(app, ip=random_ip()) as client:
        user = await register(client)
        for _ in range(3):
            assert_problem(await login(client, user["email"], "wrong password"), 401,
                           "invalid_credentials")
        blocked = await login(client, user["email"])  # even the right password waits
        assert_problem(blocked, 429, "too_many_attempts")
        assert 1 <= int(blocked.headers["retry-after"]) <= 2
        # Counted per account, in Redis: another instance refuses too.
        async with running_app(**limits) as other, client_for(other, ip=random_ip()) as c2:
            assert_problem(await login(c2, user["email"]), 429, "too_many_attempts")
        await asyncio.sleep(2.2)  # the window passes: the real user is not locked out for good
        assert (await login(client, user["email"])).status_code == 200


async def test_failed_logins_per_ip_are_limited(base_settings) -> None:
    limits = {**base_settings, "login_max_failures_per_ip": 4}
    async with running_app(**limits) as app, client_for(app, ip=random_ip()) as client:
        for _ in range(4):
            await login(client, new_email(), "wrong password")
        assert_problem(await login(client, new_email(), "wrong password"), 429,
                       "too_many_attempts")
    async with running_app(**limits) as app, client_for(app, ip=random_ip()) as fresh:
        assert_problem(await login(fresh, new_email(), "wrong password"), 401,
                       "invalid_credentials")


async def test_registration_is_limited_per_ip(base_settings) -> None:
    async with running_app(**{**base_settings, "register_max_per_ip": 2}) as app, \
            client_for(app, ip=random_ip()) as client:
        await register(client)
        await register(client)
        body = {"email": new_email(), "password": PASSWORD, "is_adult": True}
        blocked = await client.post("/auth/register", json=body)
        assert_problem(blocked, 429, "too_many_attempts")
        assert int(blocked.headers["retry-after"]) > 0


# --- headers ---------------------------------------------------------------------------------

async def test_security_headers_and_no_store(client) -> None:
    user = await register(client)
    response = await login(client, user["email"])
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "strict-transport-security" not in response.headers  # cookies not Secure here
    rid = await client.get("/healthz", headers={"X-Request-ID": "trace-123"})
    assert rid.headers["x-request-id"] == "trace-123"
    generated = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith\ttabs"})
    assert generated.headers["x-request-id"] != "bad id\twith\ttabs"


async def test_cors_allows_only_listed_origins_with_credentials(base_settings) -> None:
    allowed = "http://app.example.test"
    async with running_app(**{**base_settings, "cors_origins": [allowed]}) as app, \
            client_for(app) as client:
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type,x-csrf-token"}
        ok = await client.options("/auth/login", headers={"Origin": allowed, **preflight})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == allowed
        assert ok.headers["access-control-allow-credentials"] == "true"
        evil = await client.options("/auth/login",
                                    headers={"Origin": "http://evil.test", **preflight})
        assert "access-control-allow-origin" not in evil.headers
        simple = await client.get("/healthz", headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in simple.headers


# --- audit log ---------------------------------------------------------------------------

async def test_security_events_are_audited_by_user_id_never_email(app: FastAPI, client) -> None:
    user, token = await registered_token(client)
    await login(client, user["email"], "wrong password")
    await client.post("/me/password", headers=bearer(token),
                      json={"current_password": PASSWORD, "new_password": "another passphrase"})
    await client.post("/auth/logout", headers=bearer(token))
    await app.state.tessera.audit_trail.flush()  # logouts are audited off the request path
    async with app.state.tessera.db_factory() as db:
        rows = (await db.exec(select(AuditEvent).where(AuditEvent.user_id == user["id"])
                              .order_by(col(AuditEvent.id)))).all()
    events = [(r.event, r.outcome) for r in rows]
    for expected in (("register", "ok"), ("login", "ok"), ("login", "failed"),
                     ("password_changed", None), ("logout", None)):
        assert expected in events, events
    assert all(user["email"] not in (r.detail or "") for r in rows)


async def test_a_buffered_logout_event_is_exported_and_anonymised_with_the_account(
        app: FastAPI, client) -> None:
    user, token = await registered_token(client)
    second = (await login(client, user["email"])).json()["access_token"]
    assert (await client.post("/auth/logout", headers=bearer(token))).status_code == 204
    export = (await client.get("/me/export", headers=bearer(second))).json()
    assert "logout" in [e["event"] for e in export["security_events"]]  # flushed for it
    await client.post("/auth/logout-all", headers=bearer(second))  # buffered, not yet written
    third = (await login(client, user["email"])).json()["access_token"]
    deleted = await client.request("DELETE", "/me", headers=bearer(third),
                                   json={"password": PASSWORD})
    assert deleted.status_code == 204
    await app.state.tessera.audit_trail.flush()
    async with app.state.tessera.db_factory() as db:
        left = (await db.exec(select(AuditEvent).where(AuditEvent.user_id == user["id"]))).all()
    assert left == []  # the buffered logout-all was written, then anonymised with the rest


# --- faults ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A real redis-server this test owns, persisting to disk so a restart keeps sessions."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    return
            except OSError:
                import time

                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_redis_down_fails_closed_and_service_resumes(base_settings: dict[str, Any],
                                                           own_redis: RedisProcess) -> None:
    async with running_app(**{**base_settings, "redis_url": own_redis.url}) as app, \
            client_for(app) as client:
        user, token = await registered_token(client)
        assert (await client.get("/me", headers=bearer(token))).status_code == 200

        own_redis.stop()
        assert_problem(await client.get("/me", headers=bearer(token)), 503, "unavailable")
        assert_problem(await client.post("/auth/introspect", data={"token": token},
                                         headers=bearer(base_settings["service_keys"][0])),
                       503, "unavailable")
        assert_problem(await login(client, user["email"]), 503, "unavailable")
        ready = await client.get("/readyz")
        assert_problem(ready, 503, "unavailable")
        assert ready.json()["checks"] == {"database": "ok", "redis": "down"}
        assert (await client.get("/healthz")).status_code == 200

        own_redis.start()
        for _ in range(50):  # the client reconnects by itself
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/me", headers=bearer(token))).status_code == 200
        # And a logout still means logout.
        assert (await client.post("/auth/logout", headers=bearer(token))).status_code == 204
        assert_problem(await client.get("/me", headers=bearer(token)), 401, "not_authenticated")


async def test_database_down_answers_503_and_service_resumes(base_settings) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(str(base_settings["database_url"]))
    if not url.drivername.startswith("postgres"):
        pytest.skip("the embedded database is a file that cannot go down; this runs on the "
                    "PostgreSQL path (TESSERA_TEST_DATABASE_URL), as in CI")
    from tests.test_db_faults import FaultyProxy  # a TCP forwarder the test can cut

    proxy = FaultyProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        async with running_app(**{**base_settings, "database_url": proxied}) as app, \
                client_for(app) as client:
            user, token = await registered_token(client)
            await proxy.stop()
            assert_problem(await login(client, user["email"]), 503, "unavailable")
            assert_problem(await client.get("/me/consents", headers=bearer(token)), 503,
                           "unavailable")
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"] == {"database": "down", "redis": "ok"}
            assert (await client.get("/healthz")).status_code == 200
            await proxy.start()
            for _ in range(50):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await client.get("/me/consents", headers=bearer(token))).status_code == 200
            assert (await login(client, user["email"])).status_code == 200
    finally:
        await proxy.stop()
