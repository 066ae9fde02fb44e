"""The lean path for GET /me and introspection (app/fastpath.py) answers exactly as the full
FastAPI stack does: the same status, body and headers, the same usage events and metrics.
Two apps on the same stores, one with the fast path and one without, get the same requests.
Also: the batched Redis read (app/redis.py ReadBatcher) hands each request its own answer."""

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
VARYING = {"date", "server"}


@pytest.fixture(scope="module")
async def apps(base_settings: dict[str, Any]) -> AsyncIterator[tuple[FastAPI, FastAPI]]:
    async with running_app(**base_settings) as fast, \
            running_app(**{**base_settings, "fast_path": False}) as full:
        assert fast.fast_path is not None and full.fast_path is None
        yield fast, full


@pytest.fixture
async def clients(apps: tuple[FastAPI, FastAPI]) -> AsyncIterator[
        tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    async with client_for(apps[0]) as fast, client_for(apps[1]) as full:
        yield fast, full


def shape(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, body and the headers in order, with the random parts made comparable."""
    headers = []
    for name, value in response.headers.multi_items():
        if name in VARYING:
            continue
        if name == "x-request-id":
            value = "<generated>" if re.fullmatch(r"[0-9a-f]{16,}", value) else value
        if name == "set-cookie":
            value = re.sub(r"^visitor=[A-Za-z0-9_-]{24};", "visitor=<id>;", value)
        headers.append((name, value))
    return response.status_code, response.content, headers


async def both(clients: tuple[httpx.AsyncClient, httpx.AsyncClient], apps: tuple[FastAPI, FastAPI],
               method: str, path: str, **kw: Any) -> httpx.Response:
    """The same request to both apps; asserts they answer alike and that the fast app
    answered on its fast path exactly when `fast` says so."""
    fast_app = apps[0]
    served = fast_app.fast_path.served
    expect_fast = kw.pop("fast")
    for client in clients:  # only what the request itself says: no cookies from earlier calls
        client.cookies.clear()
    on_fast = await clients[0].request(method, path, **kw)
    on_full = await clients[1].request(method, path, **kw)
    assert shape(on_fast) == shape(on_full)
    assert fast_app.fast_path.served == served + (1 if expect_fast else 0), \
        "the request did not take the expected path"
    return on_fast


async def test_get_me_answers_alike(clients, apps) -> None:
    user, token = await registered_token(clients[0])
    auth = bearer(token)
    await clients[0].get("/me", headers=auth)  # the first request caches the profile
    ok = await both(clients, apps, "GET", "/me", headers=auth, fast=True)
    assert ok.status_code == 200 and ok.json()["email"] == user["email"]
    assert ok.headers["tk"] == "T" and ok.cookies.get("visitor")
    for opt_out in ({"DNT": "1"}, {"Sec-GPC": "1"}):
        quiet = await both(clients, apps, "GET", "/me", headers={**auth, **opt_out}, fast=True)
        assert quiet.headers["tk"] == "N" and "set-cookie" not in quiet.headers
    known = await both(clients, apps, "GET", "/me", fast=True,
                       headers={**auth, "Cookie": "visitor=abc", "X-Request-ID": "trace-7"})
    assert "set-cookie" not in known.headers and known.headers["x-request-id"] == "trace-7"
    # Handed to the full stack, which answers them as before.
    await both(clients, apps, "GET", "/me", headers=bearer(token + "x"), fast=False)
    await both(clients, apps, "GET", "/me", headers=bearer("not-a-jwt"), fast=False)
    await both(clients, apps, "GET", "/me", fast=False)
    await both(clients, apps, "GET", "/me", headers={"Authorization": f"Basic {token}"},
               fast=False)
    await both(clients, apps, "GET", "/me?x=1", headers=auth, fast=False)
    await both(clients, apps, "GET", "/me", headers={**auth, "Cookie": "a=" + "b" * 5000},
               fast=False)
    await both(clients, apps, "POST", "/me", headers=auth, fast=False)


async def test_a_restricted_user_is_not_tracked_on_either_path(clients, apps) -> None:
    _, token = await registered_token(clients[0])
    restricted = await clients[0].put("/me/restrictions", headers=bearer(token), json={
        "restrict_processing": True, "object_to_processing": False})
    assert restricted.status_code == 200, restricted.text
    await clients[0].get("/me", headers=bearer(token))  # the profile is cached again
    response = await both(clients, apps, "GET", "/me", headers=bearer(token), fast=True)
    assert response.headers["tk"] == "N" and "set-cookie" not in response.headers


async def test_an_uncached_profile_is_loaded_by_the_full_stack(clients, apps) -> None:
    user, token = await registered_token(clients[0])
    t = apps[0].state.tessera
    await t.redis.delete(profile_key(user["id"]))
    served = apps[0].fast_path.served
    response = await clients[0].get("/me", headers=bearer(token))
    assert response.status_code == 200 and response.json()["id"] == user["id"]
    assert apps[0].fast_path.served == served  # answered by the full stack ...
    assert await t.redis.exists(profile_key(user["id"]))  # ... which cached the profile
    await both(clients, apps, "GET", "/me", headers=bearer(token), fast=True)


async def test_usage_events_and_metrics_alike(clients, apps) -> None:
    _, token = await registered_token(clients[0])
    await clients[0].get("/me", headers={**bearer(token), "DNT": "1"})  # caches the profile
    served = apps[0].fast_path.served
    for client in clients:
        await client.get("/me", headers={**bearer(token), "Host": "api.example"})
    assert apps[0].fast_path.served == served + 1
    await clients[0].get("/me", headers={**bearer(token), "DNT": "1"})  # not logged
    for app in apps:
        await app.state.tessera.usage.flush()
    export = (await clients[0].get("/me/export", headers={**bearer(token), "DNT": "1"})).json()
    events = [{k: v for k, v in e.items() if k != "at"} for e in export["usage_log"]
              if e["path"] == "/me"]
    assert len(events) == 2 and events[0] == events[1], events
    assert events[0]["host"] == "api.example" and events[0]["status"] == 200
    before = _me_count(await clients[0].get("/metrics"))
    await clients[0].get("/me", headers=bearer(token))
    assert _me_count(await clients[0].get("/metrics")) == before + 1


def _me_count(metrics: httpx.Response) -> float:
    match = re.search(r'tessera_http_requests_total\{method="GET",route="/me",status="200"\} '
                      r'([0-9.e+]+)', metrics.text)
    return float(match.group(1)) if match else 0.0


async def test_introspection_answers_alike(clients, apps) -> None:
    _, token = await registered_token(clients[0])
    await clients[0].get("/me", headers=bearer(token))  # the first request caches the profile
    active = await both(clients, apps, "POST", "/auth/introspect", data={"token": token},
                        headers=SERVICE, fast=True)
    assert active.json()["active"] is True and active.json()["token_type"] == "Bearer"
    for token_value in ("garbage", token + "x", "", "a.b.c", "x" * 5000):
        inactive = await both(clients, apps, "POST", "/auth/introspect",
                              data={"token": token_value}, headers=SERVICE, fast=True)
        assert inactive.json() == {"active": False}
    await both(clients, apps, "POST", "/auth/introspect", data={"token": token},
               headers={**SERVICE, "DNT": "1"}, fast=True)
    await both(clients, apps, "POST", "/auth/introspect", content=b"", headers=SERVICE, fast=True)
    # Handed to the full stack: no or a wrong service key, a malformed or oversized body.
    await both(clients, apps, "POST", "/auth/introspect", data={"token": token}, fast=False)
    await both(clients, apps, "POST", "/auth/introspect", data={"token": token},
               headers=bearer("wrong-key-" + "y" * 30), fast=False)
    await both(clients, apps, "POST", "/auth/introspect", content=b"token=\xff\xfe",
               headers={**SERVICE, **FORM}, fast=False)
    await both(clients, apps, "POST", "/auth/introspect", content=b"token=" + b"a" * 70000,
               headers={**SERVICE, **FORM}, fast=False)
    await both(clients, apps, "GET", "/auth/introspect", headers=SERVICE, fast=False)
    # A logged-out token is inactive on both, at once.
    assert (await clients[0].post("/auth/logout", headers=bearer(token))).status_code == 204
    gone = await both(clients, apps, "POST", "/auth/introspect", data={"token": token},
                      headers=SERVICE, fast=True)
    assert gone.json() == {"active": False}


async def test_introspection_of_an_uncached_profile_replays_the_body(clients, apps) -> None:
    user, token = await registered_token(clients[0])
    await apps[0].state.tessera.redis.delete(profile_key(user["id"]))
    served = apps[0].fast_path.served
    response = await clients[0].post("/auth/introspect", data={"token": token}, headers=SERVICE)
    assert response.status_code == 200 and response.json()["sub"] == user["id"]
    assert apps[0].fast_path.served == served


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


async def test_bodies_and_bad_tokens_on_get_me_answer_alike(clients, apps) -> None:
    _, token = await registered_token(clients[0])
    auth = bearer(token)
    await clients[0].get("/me", headers=auth)
    too_big = await both(clients, apps, "GET", "/me", headers=auth, content=b"x" * 70000,
                         fast=False)
    assert too_big.status_code == 413
    assert (await both(clients, apps, "GET", "/me", headers={**auth, "Content-Length": "abc"},
                       fast=False)).status_code == 400
    # Deeply nested JSON in the token's payload: 401 (and inactive), never a 500.
    payload = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode()
    nested = f"eyJhbGciOiJFZERTQSJ9.{payload}.c2ln"
    assert (await both(clients, apps, "GET", "/me", headers=bearer(nested),
                       fast=False)).status_code == 401
    inactive = await both(clients, apps, "POST", "/auth/introspect", data={"token": nested},
                          headers=SERVICE, fast=True)
    assert inactive.json() == {"active": False}


async def test_with_cors_configured_both_paths_vary_on_origin(base_settings) -> None:
    cors = {**base_settings, "cors_origins": ["https://app.example"]}
    async with running_app(**cors) as fast, running_app(**cors, fast_path=False) as full, \
            client_for(fast) as on_fast, client_for(full) as on_full:
        _, token = await registered_token(on_fast)
        await on_fast.get("/me", headers=bearer(token))
        response = await both((on_fast, on_full), (fast, full), "GET", "/me",
                              headers=bearer(token), fast=True)
        assert response.headers["vary"] == "DNT, Sec-GPC, Origin"
        await both((on_fast, on_full), (fast, full), "GET", "/me", fast=False,
                   headers={**bearer(token), "Origin": "https://app.example"})


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
        assert len(calls) == 1  # the full stack raised the fast path's error, no second read
        assert_problem(await clients[0].post("/auth/introspect", data={"token": token},
                                             headers=SERVICE), 503, "unavailable")
        assert len(calls) == 2
    finally:
        del reads.mget
    assert (await clients[0].get("/me", headers=bearer(token))).status_code == 200


def test_a_forked_worker_makes_its_own_visitor_and_request_ids() -> None:
    import os

    from tessera.edge.middleware import request_id_from
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
