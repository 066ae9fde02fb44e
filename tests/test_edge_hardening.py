"""Findings of a review of the one edge, each pinned: a crafted token must not fail other
users' batched reads; a profile read before a change is not cached after it; odd client
credentials and streamed bodies on the lean handlers are 4xx; an oversized request of a
restricted user is not tracked; a malformed database URL is one line."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from fastapi import FastAPI

from tests.conftest import (
    SERVICE_KEY,
    assert_problem,
    bearer,
    client_for,
    login,
    register,
    registered_token,
)


def _b64(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


def crafted_token(sid: str) -> str:
    payload = json.dumps({"sub": "a", "sid": sid, "exp": 1}, ensure_ascii=True).encode()
    header = _b64(b'{"alg":"none"}')
    return f"{header}.{_b64(payload)}.x"


async def test_a_crafted_token_does_not_fail_other_requests_reads(app: FastAPI) -> None:
    async with client_for(app) as client:
        _, token = await registered_token(client)
        evil = crafted_token("\ud800")  # a lone surrogate: not encodable as a Redis key
        requests = []
        for _ in range(20):
            requests.append(client.get("/me", headers=bearer(token)))
            requests.append(client.get("/me", headers=bearer(evil)))
            requests.append(client.get("/policy", headers={"Cookie": f"session={evil}"}))
        answers = await asyncio.gather(*requests)
    assert [a.status_code for a in answers[0::3]] == [200] * 20
    assert [a.status_code for a in answers[1::3]] == [401] * 20
    assert [a.status_code for a in answers[2::3]] == [200] * 20


async def test_a_profile_read_before_a_change_is_not_cached_after_it(app: FastAPI) -> None:
    from tessera.domain.profiles import Profile

    t = app.state.tessera
    async with client_for(app) as client:
        user, token = await registered_token(client)
    uid = user["id"]
    stale = Profile(policy_seq=0, is_active=True, is_admin=False, tracking_allowed=True,
                    me={"id": uid})
    generation = await t.profiles.generation(uid)  # a request reads the row ...
    await t.profiles.invalidate(uid)  # ... a restriction commits meanwhile ...
    assert await t.profiles.store(uid, stale, generation) is False  # ... not cached
    assert await t.redis.get(f"tessera:{{{uid}}}:profile") is None
    assert await t.profiles.store(uid, stale, await t.profiles.generation(uid)) is True


async def test_odd_client_credentials_and_streamed_bodies_on_introspection(client) -> None:
    answers = [await client.post("/auth/introspect", data={"token": "x"},
                                 headers={"Authorization": value})
               for value in ("Basic \u00ff\u00fe".encode("latin-1"), "Basic ====",
                             "Basic " + "a" * 5,
                             "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode())]
    for answer in answers:
        assert_problem(answer, 401, "invalid_client")

    async def chunks():
        for _ in range(20):
            yield b"token=" + b"x" * 8192

    streamed = await client.post("/auth/introspect", content=chunks(), headers={
        **bearer(SERVICE_KEY), "Content-Type": "application/x-www-form-urlencoded"})
    assert_problem(streamed, 413, "payload_too_large")


async def test_an_oversized_request_of_a_restricted_user_is_not_tracked(app: FastAPI) -> None:
    async with client_for(app) as client:
        user = await register(client)
        token = (await login(client, user["email"])).json()["access_token"]
        await client.put("/me/restrictions", headers=bearer(token), json={
            "restrict_processing": True, "object_to_processing": False})
        client.cookies.clear()
        refused = await client.get("/me", headers={**bearer(token), "Cookie": "a=" + "b" * 5000})
    assert_problem(refused, 431, "request_header_fields_too_large")
    assert refused.headers["tk"] == "N" and "set-cookie" not in refused.headers


async def test_operator_paths_with_a_trailing_slash_set_no_visitor_cookie(client) -> None:
    client.cookies.clear()
    response = await client.get("/healthz/")
    assert "visitor" not in response.headers.get("set-cookie", "")


def test_a_malformed_database_url_is_one_line_without_its_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update(TESSERA_DATA_DIR=str(tmp_path), TESSERA_DATABASE_URL="postgresql://u:pw9@[::1")
    done = subprocess.run([sys.executable, "-m", "tessera.ops.cli", "migrate"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("tessera: TESSERA_DATABASE_URL: ")
    assert len(done.stderr.strip().splitlines()) == 1 and "pw9" not in done.stderr
