"""Findings of the security review, each pinned by a test."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tessera.config import Settings
from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    client_for,
    login,
    register,
    registered_token,
    running_app,
)
from tests.test_resilience import random_ip


async def test_concurrent_wrong_passwords_cannot_slip_past_the_limit(base_settings) -> None:
    limits = {**base_settings, "login_max_failures_per_account": 3}
    async with running_app(**limits) as app, client_for(app, ip=random_ip()) as client:
        user = await register(client)
        answers = await asyncio.gather(*(login(client, user["email"], "wrong password")
                                         for _ in range(12)))
        codes = sorted(r.status_code for r in answers)
        assert codes.count(401) <= 3 and codes.count(429) >= 9, codes


async def test_password_confirmation_is_limited_too(base_settings) -> None:
    limits = {**base_settings, "login_max_failures_per_account": 2}
    async with running_app(**limits) as app, client_for(app) as client:
        _, token = await registered_token(client)
        for _ in range(2):
            wrong = await client.request("DELETE", "/me", json={"password": "guess guess"},
                                         headers=bearer(token))
            assert_problem(wrong, 403, "invalid_credentials")
        blocked = await client.post("/me/password", headers=bearer(token), json={
            "current_password": PASSWORD, "new_password": "another passphrase"})
        assert_problem(blocked, 429, "too_many_attempts")


async def test_cross_site_login_is_refused(base_settings) -> None:
    allowed = "http://app.example.test"
    async with running_app(**{**base_settings, "cors_origins": [allowed]}) as app, \
            client_for(app) as client:
        user = await register(client)
        creds = {"username": user["email"], "password": PASSWORD}
        evil = await client.post("/auth/login", data=creds, headers={
            "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
        assert_problem(evil, 403, "csrf_failed")
        assert "set-cookie" not in evil.headers or "session=" not in evil.headers["set-cookie"]
        assert (await client.post("/auth/login", data=creds, headers={
            "Origin": allowed, "Sec-Fetch-Site": "same-site"})).status_code == 200
        assert (await client.post("/auth/login", data=creds, headers={
            "Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})).status_code == 200
        assert (await client.post("/auth/login", data=creds)).status_code == 200  # no browser


async def test_oversized_cookie_header_is_refused_before_parsing(client) -> None:
    response = await client.get("/healthz", headers={"Cookie": 'visitor="' + "\\" * 20000,
                                                     "DNT": "1"})
    assert_problem(response, 431, "request_header_fields_too_large")
    assert response.headers["tk"] == "N"


async def test_restricted_user_is_not_tracked_on_login_or_logout(client) -> None:
    user, token = await registered_token(client)
    await client.put("/me/restrictions", headers=bearer(token),
                     json={"restrict_processing": False, "object_to_processing": True})
    client.cookies.clear()
    logged_in = await login(client, user["email"])
    assert logged_in.headers["tk"] == "N"
    assert "visitor=" not in ",".join(logged_in.headers.get_list("set-cookie"))
    client.cookies.clear()
    out = await client.post("/auth/logout",
                            headers=bearer(logged_in.json()["access_token"]))
    assert out.headers["tk"] == "N"


async def test_payload_too_large_still_carries_the_privacy_headers(client) -> None:
    response = await client.post("/auth/login", content=b"x" * 70000,
                                 headers={"Content-Type": "application/json", "DNT": "1"})
    assert_problem(response, 413, "payload_too_large")
    assert response.headers["tk"] == "N" and "DNT" in response.headers["vary"]


async def test_no_redirect_built_from_the_host_header(client) -> None:
    response = await client.get("/me/", headers={"Host": "evil.example"})
    assert response.status_code == 404
    assert "location" not in response.headers


def test_settings_refuse_wildcard_origins_and_short_service_keys() -> None:
    for bad in ("*", "null", "https://app.example.com/", "app.example.com"):
        with pytest.raises(ValidationError):
            Settings(cors_origins=bad)
    with pytest.raises(ValidationError):
        Settings(service_keys="short")
    assert Settings(cors_origins="https://a.example, http://127.0.0.1:8080").cors_origins == [
        "https://a.example", "http://127.0.0.1:8080"]


def test_embedded_redis_is_durable_and_keeps_its_folder_private(tmp_path: Path) -> None:
    import redis

    from tessera.ops.embedded import EmbeddedRedis

    embedded = EmbeddedRedis(tmp_path / "data")
    try:
        client = redis.Redis.from_url(embedded.start(), decode_responses=True)
        # Every write is in the append-only file, fsynced, before Redis answers.
        config = client.config_get("append*")
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "always")
        assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) == 0o700
        client.set("k", "v")
        client.close()
    finally:
        embedded.stop()
    assert (tmp_path / "data" / "redis.aof").exists()
    again = EmbeddedRedis(tmp_path / "data")
    try:
        client = redis.Redis.from_url(again.start(), decode_responses=True)
        assert client.get("k") == "v"  # sessions survive a restart
        client.close()
    finally:
        again.stop()


async def test_a_forged_session_record_without_the_secret_is_refused(app, client) -> None:
    import hashlib
    import json
    import time

    import jwt

    user, token = await registered_token(client)
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode({**claims, "sid": "forged-sid"}, key=None, algorithm="none")
    record: dict[str, Any] = {"sid": "forged-sid", "user_id": user["id"],
                              "token_hash": hashlib.sha256(forged.encode()).hexdigest(),
                              "created_at": int(time.time()), "expires_at": int(time.time()) + 60,
                              "user_agent": None}
    await app.state.tessera.redis.set(f"tessera:{{{user['id']}}}:s:forged-sid",
                                      json.dumps(record), ex=60)
    assert_problem(await client.get("/me", headers=bearer(forged)), 401, "not_authenticated")


async def test_a_user_keeps_at_most_100_sessions(app, client) -> None:
    from tessera.stores.sessions import MAX_SESSIONS_PER_USER

    user = await register(client)
    first = (await login(client, user["email"])).json()["access_token"]
    for _ in range(MAX_SESSIONS_PER_USER):
        assert (await login(client, user["email"])).status_code == 200
    last = (await login(client, user["email"])).json()["access_token"]
    sessions = (await client.get("/auth/sessions", headers=bearer(last))).json()
    assert len(sessions) == MAX_SESSIONS_PER_USER
    assert_problem(await client.get("/me", headers=bearer(first)), 401, "not_authenticated")
