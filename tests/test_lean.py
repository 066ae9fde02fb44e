"""The lean endpoints (api/lean.py: GET /me, POST /auth/introspect, GET /healthz), written
once each as plain ASGI handlers behind the one edge: the answers, privacy headers, usage
events and metrics they give. Also: the batched Redis read (stores/redis.py ReadBatcher)
hands each request its own answer."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.exceptions import ConnectionError as RedisConnectionError

from tessera.domain.profiles import profile_key
from tessera.stores.redis import ReadBatcher
from tests.conftest import (
    SERVICE_KEY,
    assert_problem,
    bearer,
    client_for,
    registered_token,
    running_app,
)

SERVICE = bearer(SERVICE_KEY)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
async def apps(base_settings: dict[str, Any]) -> AsyncIterator[tuple[FastAPI]]:
    async with running_app(**base_settings) as app:
        yield (app,)


@pytest.fixture
async def clients(apps: tuple[FastAPI]) -> AsyncIterator[tuple[httpx.AsyncClient]]:
    async with client_for(apps[0]) as client:
        yield (client,)


async def fresh(clients: tuple[httpx.AsyncClient], method: str, path: str,
                **kw: Any) -> httpx.Response:
    """A request carrying only what it says itself (no cookies from earlier calls)."""
    clients[0].cookies.clear()
    return await clients[0].request(method, path, **kw)


async def test_get_me_answers_with_the_privacy_headers(clients) -> None:
    user, token = await registered_token(clients[0])
    auth = bearer(token)
    ok = await fresh(clients, "GET", "/me", headers=auth)
    assert ok.status_code == 200 and ok.json()["email"] == user["email"]
    assert ok.headers["tk"] == "T" and ok.cookies.get("visitor")
    assert ok.headers["cache-control"] == "no-store"
    assert ok.headers["x-content-type-options"] == "nosniff"
    assert ok.headers["vary"] == "DNT, Sec-GPC"
    for opt_out in ({"DNT": "1"}, {"Sec-GPC": "1"}):
        quiet = await fresh(clients, "GET", "/me", headers={**auth, **opt_out})
        assert quiet.headers["tk"] == "N" and "set-cookie" not in quiet.headers
    known = await fresh(clients, "GET", "/me",
                        headers={**auth, "Cookie": "visitor=abc", "X-Request-ID": "trace-7"})
    assert "set-cookie" not in known.headers and known.headers["x-request-id"] == "trace-7"
    for bad in (bearer(token + "x"), bearer("not-a-jwt"), {},
                {"Authorization": f"Basic {token}"}):
        refused = await fresh(clients, "GET", "/me", headers=bad)
        assert_problem(refused, 401, "not_authenticated")
        assert refused.headers["www-authenticate"] == "Bearer"
    assert (await fresh(clients, "GET", "/me?x=1", headers=auth)).status_code == 200
    assert_problem(await fresh(clients, "GET", "/me", headers={**auth, "Cookie": "a=" + "b" * 5000}),
                   431, "request_header_fields_too_large")
    assert_problem(await fresh(clients, "POST", "/me", headers=auth), 405, "method_not_allowed")


async def test_get_me_by_session_cookie(clients) -> None:
    user, token = await registered_token(clients[0])
    response = await fresh(clients, "GET", "/me", headers={"Cookie": f"session={token}"})
    assert response.status_code == 200 and response.json()["id"] == user["id"]


async def test_a_restricted_user_is_not_tracked(clients) -> None:
    _, token = await registered_token(clients[0])
    restricted = await clients[0].put("/me/restrictions", headers=bearer(token), json={
        "restrict_processing": True, "object_to_processing": False})
    assert restricted.status_code == 200, restricted.text
    response = await fresh(clients, "GET", "/me", headers=bearer(token))
    assert response.headers["tk"] == "N" and "set-cookie" not in response.headers


async def test_an_uncached_profile_is_loaded_and_cached(clients, apps) -> None:
    user, token = await registered_token(clients[0])
    t = apps[0].state.tessera
    await t.redis.delete(profile_key(user["id"]))
    response = await clients[0].get("/me", headers=bearer(token))
    assert response.status_code == 200 and response.json()["id"] == user["id"]
    assert await t.redis.exists(profile_key(user["id"]))


async def test_usage_events_and_metrics(clients, apps) -> None:
    _, token = await registered_token(clients[0])
    for _ in range(2):
        await clients[0].get("/me", headers={**bearer(token), "Host": "api.example"})
    await clients[0].get("/me", headers={**bearer(token), "DNT": "1"})  # not logged
    await apps[0].state.tessera.usage.flush()
    export = (await clients[0].get("/me/export", headers={**bearer(token), "DNT": "1"})).json()
    events = [{k: v for k, v in e.items() if k != "at"} for e in export["usage_log"]
              if e["path"] == "/me"]
    assert len(events) == 2 and events[0] == events[1], events
    assert events[0]["host"] == "api.example" and events[0]["status"] == 200
    assert events[0]["bytes"] > 0
    before = _me_count(await clients[0].get("/metrics"))
    await clients[0].get("/me", headers=bearer(token))
    assert _me_count(await clients[0].get("/metrics")) == before + 1


def _me_count(metrics: httpx.Response) -> float:
    match = re.search(r'tessera_http_requests_total\{method="GET",route="/me",status="200"\} '
                      r'([0-9.e+]+)', metrics.text)
    return float(match.group(1)) if match else 0.0


async def test_introspection(clients) -> None:
    _, token = await registered_token(clients[0])
    active = await fresh(clients, "POST", "/auth/introspect", data={"token": token},
                         headers=SERVICE)
    assert active.json()["active"] is True and active.json()["token_type"] == "Bearer"
    assert active.headers["cache-control"] == "no-store"
    for token_value in ("garbage", token + "x", "a.b.c", "x" * 5000):
        inactive = await fresh(clients, "POST", "/auth/introspect",
                               data={"token": token_value}, headers=SERVICE)
        assert inactive.json() == {"active": False}
    dnt = await fresh(clients, "POST", "/auth/introspect", data={"token": token},
                      headers={**SERVICE, "DNT": "1"})
    assert dnt.json()["active"] is True and dnt.headers["tk"] == "N"
    # RFC 7662: `token` is required.
    for body in (b"", b"token=", b"token_type_hint=access_token"):
        assert_problem(await fresh(clients, "POST", "/auth/introspect", content=body,
                                   headers={**SERVICE, **FORM}), 400, "invalid_request")
    # No or a wrong service key; a malformed or oversized body; another method.
    assert_problem(await fresh(clients, "POST", "/auth/introspect", data={"token": token}),
                   401, "invalid_client")
    assert_problem(await fresh(clients, "POST", "/auth/introspect", data={"token": token},
                               headers=bearer("wrong-key-" + "y" * 30)), 401, "invalid_client")
    assert_problem(await fresh(clients, "POST", "/auth/introspect", content=b"token=\xff\xfe",
                               headers={**SERVICE, **FORM}), 400, "malformed_body")
    assert_problem(await fresh(clients, "POST", "/auth/introspect",
                               content=b"token=" + b"a" * 70000, headers={**SERVICE, **FORM}),
                   413, "payload_too_large")
    assert_problem(await fresh(clients, "GET", "/auth/introspect", headers=SERVICE),
                   405, "method_not_allowed")
    # A logged-out token is inactive at once.
    assert (await clients[0].post("/auth/logout", headers=bearer(token))).status_code == 204
    gone = await fresh(clients, "POST", "/auth/introspect", data={"token": token},
                       headers=SERVICE)
    assert gone.json() == {"active": False}


async def test_introspection_takes_basic_and_client_secret_post(clients) -> None:
    _, token = await registered_token(clients[0])
    basic = base64.b64encode(f"any-client:{SERVICE_KEY}".encode()).decode()
    by_basic = await fresh(clients, "POST", "/auth/introspect", data={"token": token},
                           headers={"Authorization": f"Basic {basic}"})
    assert by_basic.status_code == 200 and by_basic.json()["active"] is True
    by_post = await fresh(clients, "POST", "/auth/introspect", data={
        "token": token, "client_id": "svc", "client_secret": SERVICE_KEY})
    assert by_post.status_code == 200 and by_post.json()["active"] is True
    wrong = base64.b64encode(b"any-client:not-the-key").decode()
    assert_problem(await fresh(clients, "POST", "/auth/introspect", data={"token": token},
                               headers={"Authorization": f"Basic {wrong}"}),
                   401, "invalid_client")
    assert_problem(await fresh(clients, "POST", "/auth/introspect",
                               data={"token": token, "client_secret": "nope"}),
                   401, "invalid_client")


async def test_introspection_of_an_uncached_profile(clients, apps) -> None:
    user, token = await registered_token(clients[0])
    await apps[0].state.tessera.redis.delete(profile_key(user["id"]))
    response = await clients[0].post("/auth/introspect", data={"token": token}, headers=SERVICE)
    assert response.status_code == 200 and response.json()["sub"] == user["id"]


async def test_healthz_is_lean_and_declared(clients) -> None:
    response = await fresh(clients, "GET", "/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert_problem(await fresh(clients, "DELETE", "/healthz"), 405, "method_not_allowed")
    schema = (await fresh(clients, "GET", "/openapi.json")).json()
    assert "get" in schema["paths"]["/healthz"] and "get" in schema["paths"]["/me"]
    assert "post" in schema["paths"]["/auth/introspect"]
    assert "patch" in schema["paths"]["/me"]  # the FastAPI routes of the same path stay


async def test_concurrent_checks_share_one_read_and_each_gets_its_own_answer(clients,
                                                                              apps) -> None:
    client = clients[0]
    users = [await registered_token(client) for _ in range(6)]
    for _, token in users:
        await client.get("/me", headers=bearer(token))  # caches the profiles
    sessions = apps[0].state.tessera.sessions
    sent: list[int] = []
    original = sessions.reads.redis.mget

    async def counting_mget(keys: list[str]) -> Any:
        sent.append(len(keys))
        return await original(keys)

    sessions.reads.redis.mget = counting_mget
    try:
        requests = [client.get("/me", headers=bearer(token)) for _ in range(5)
                    for _, token in users]
        answers = await asyncio.gather(*requests)
    finally:
        del sessions.reads.redis.mget
    assert [a.json()["email"] for a in answers] == [u["email"] for u, _ in users] * 5
    # One session key and one profile key per request, in fewer commands than requests.
    assert sum(sent) == 2 * len(requests) and len(sent) < len(requests), sent


async def test_read_batcher_splits_results_and_survives_a_cancelled_waiter(apps) -> None:
    t = apps[0].state.tessera
    await t.redis.mset({"fp:a": "1", "fp:b": "2", "fp:c": "3"})
    batcher = ReadBatcher(t.redis)
    cancelled = asyncio.ensure_future(batcher.mget(["fp:a", "fp:b"]))
    others = [asyncio.ensure_future(batcher.mget(keys))
              for keys in (["fp:c"], ["fp:b", "fp:missing", "fp:a"], [])]
    await asyncio.sleep(0)
    cancelled.cancel()
    assert await asyncio.gather(*others) == [["3"], ["2", None, "1"], []]
    assert await batcher.mget(["fp:a"]) == ["1"]
    many = await asyncio.gather(*(batcher.mget(["fp:a", "fp:c"])
                                  for _ in range(ReadBatcher.MAX_KEYS)))
    assert many == [["1", "3"]] * ReadBatcher.MAX_KEYS


async def test_bodies_and_bad_tokens_on_get_me(clients) -> None:
    _, token = await registered_token(clients[0])
    auth = bearer(token)
    await clients[0].get("/me", headers=auth)
    too_big = await fresh(clients, "GET", "/me", headers=auth, content=b"x" * 70000)
    assert too_big.status_code == 413
    bad_length = await fresh(clients, "GET", "/me", headers={**auth, "Content-Length": "abc"})
    assert bad_length.status_code == 400
    # Deeply nested JSON in the token's payload: 401 (and inactive), never a 500.
    payload = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode()
    nested = f"eyJhbGciOiJFZERTQSJ9.{payload}.c2ln"
    assert (await fresh(clients, "GET", "/me", headers=bearer(nested))).status_code == 401
    inactive = await fresh(clients, "POST", "/auth/introspect", data={"token": nested},
                           headers=SERVICE)
    assert inactive.json() == {"active": False}


async def test_with_cors_configured_vary_names_origin_once(base_settings) -> None:
    cors = {**base_settings, "cors_origins": ["https://app.example"]}
    async with running_app(**cors) as app, client_for(app) as client:
        _, token = await registered_token(client)
        response = await client.get("/me", headers={**bearer(token),
                                                     "Origin": "https://app.example"})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert response.headers.get_list("vary") == ["Origin, DNT, Sec-GPC"]
        preflight = await client.options("/me", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
        assert preflight.status_code == 200 and preflight.headers["tk"] in ("T", "N")


async def test_a_failing_store_is_tried_once_and_answered_503(clients, apps) -> None:
    _, token = await registered_token(clients[0])
    await clients[0].get("/me", headers=bearer(token))
    reads = apps[0].state.tessera.sessions.reads
    calls: list[list[str]] = []

    async def failing_mget(keys: list[str]) -> Any:  # Redis refusing, as a dead server does
        calls.append(keys)
        raise RedisConnectionError("connection refused")

    reads.mget = failing_mget
    try:
        assert_problem(await clients[0].get("/me", headers=bearer(token)), 503, "unavailable")
        assert len(calls) == 1  # one read: the edge's, handed to the route, not tried again
        assert_problem(await clients[0].post("/auth/introspect", data={"token": token},
                                             headers=SERVICE), 503, "unavailable")
        assert len(calls) == 2
    finally:
        del reads.mget
    assert (await clients[0].get("/me", headers=bearer(token))).status_code == 200


def test_a_forked_worker_makes_its_own_visitor_and_request_ids() -> None:
    import os

    from tessera.edge.edge import request_id_from
    from tessera.edge.privacy import _visitor_ids

    mine = _visitor_ids.next(), request_id_from(None)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what it would hand out next
        os.write(write, _visitor_ids.next() + b" " + request_id_from(None).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_visitor, child_request = os.read(read, 200).split()
    assert child_visitor != _visitor_ids.next()  # not the parent's next one
    assert child_request[:8] != mine[1][:8].encode()  # another prefix
    assert len(mine[0]) == 24 and mine[0] != child_visitor


# --- the token check's memos (stores/memo.py): they save decoding, never answer stale ------


def test_memo_is_bounded_by_size_and_age(monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera.stores import memo as memo_module

    now = [1000.0]
    monkeypatch.setattr(memo_module.time, "monotonic", lambda: now[0])
    m: memo_module.Memo[str, int] = memo_module.Memo(limit=3, max_age=60.0)
    for i in range(3):
        m.put(f"k{i}", i)
    assert [m.get(f"k{i}") for i in range(3)] == [0, 1, 2]
    m.put("k3", 3)  # full: starts over rather than growing
    assert len(m) == 1 and m.get("k0") is None and m.get("k3") == 3
    now[0] += 61  # every entry leaves memory within max_age of the memo's last start
    assert m.get("k3") is None and len(m) == 0


async def test_memoised_token_sees_every_change_and_the_logout(clients) -> None:
    user, token = await registered_token(clients[0])
    auth = bearer(token)
    for _ in range(3):  # the token, its session record and the profile are memoised now
        first = await fresh(clients, "GET", "/me", headers=auth)
        assert first.status_code == 200
        assert first.json()["consents"]["analytics"]["granted"] is False
    put = await fresh(clients, "PUT", "/me/consents/analytics", headers=auth,
                      json={"granted": True})
    assert put.status_code == 200
    changed = await fresh(clients, "GET", "/me", headers=auth)
    assert changed.json()["consents"]["analytics"]["granted"] is True
    restricted = await fresh(clients, "PUT", "/me/restrictions", headers=auth,
                             json={"restrict_processing": True, "object_to_processing": False})
    assert restricted.status_code == 200
    after = await fresh(clients, "GET", "/me", headers=auth)
    assert after.json()["restrictions"]["restrict_processing"] is True
    assert after.headers["tk"] == "N"  # the memoised profile did not keep tracking on
    active = await fresh(clients, "POST", "/auth/introspect", headers={**SERVICE, **FORM},
                         content=f"token={token}")
    assert active.json()["active"] is True
    assert (await fresh(clients, "POST", "/auth/logout", headers=auth)).status_code == 204
    assert (await fresh(clients, "GET", "/me", headers=auth)).status_code == 401
    gone = await fresh(clients, "POST", "/auth/introspect", headers={**SERVICE, **FORM},
                       content=f"token={token}")
    assert gone.json() == {"active": False}


async def test_requests_finding_the_policy_stale_share_one_load(apps) -> None:
    """A burst of gated requests at the policy cache's expiry costs one load, not one each
    (domain/policy.py PolicyCache); an invalidation is never answered by an older load."""
    from sqlalchemy import event

    t = apps[0].state.tessera
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "policy_version" in statement.lower():
            statements.append(statement)

    event.listen(t.engine.sync_engine, "before_cursor_execute", count)
    try:
        t.policy.invalidate()
        states = await asyncio.gather(*(t.policy.get() for _ in range(20)))
        loads = len(statements)
        assert loads == 2  # load_policy_state's two queries, once for all twenty
        assert all(s is states[0] for s in states)
        t.policy.invalidate()
        statements.clear()
        await t.policy.get()
        assert len(statements) == 2  # invalidated: loaded afresh
    finally:
        event.remove(t.engine.sync_engine, "before_cursor_execute", count)


async def test_what_start_up_built_is_frozen_out_of_the_cyclic_gc(
        base_settings: dict[str, Any]) -> None:
    """A full collection walked the whole start-up heap and stopped the loop ~130 ms a few
    times a second under load (p99 of GET /me ~110 ms); frozen, it walks what requests make.
    Torn down, the app gives it back to the collector (a test process makes many apps)."""
    import gc

    async with running_app(**base_settings):
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0
