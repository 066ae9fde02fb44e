"""It scales out: two real `tessera serve` instances on one database and one Redis.

A session deleted on one instance is refused on the other at once; a key rotated with
`tessera keys rotate` is used and published by both within their key cache time, while
tokens signed with the old key keep working; and a service that verifies tokens locally
while following one instance's revocation feed rejects a token logged out on the other
within a second.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tessera_verify import TesseraVerifier, TokenRejected
from tests.conftest import SERVICE_KEY, assert_problem, bearer, login, register
from tests.servers import TesseraServer, run_cli, shared_secret, tessera_env, tessera_server

KEYS_CACHE_SECONDS = 1  # TESSERA_KEYS_CACHE_SECONDS of both instances (tests/servers.py)


@pytest.fixture(scope="module")
def env(base_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
        ) -> dict[str, str]:
    return tessera_env(database_url=str(base_settings["database_url"]),
                       redis_url=str(base_settings["redis_url"]),
                       secret=shared_secret(base_settings["data_dir"]),
                       data_dir=tmp_path_factory.mktemp("multi-instance"),
                       service_key=SERVICE_KEY,
                       TESSERA_REDIS_DURABILITY=str(base_settings["redis_durability"]))


@pytest.fixture(scope="module")
def instances(env: dict[str, str]) -> Iterator[tuple[TesseraServer, TesseraServer]]:
    logs = Path(env["TESSERA_DATA_DIR"]) / "logs"
    # One after the other: the first applies migrations and makes the first key.
    with tessera_server(env, logs, name="a") as a, tessera_server(env, logs, name="b") as b:
        yield a, b


@pytest.fixture
async def clients(instances: tuple[TesseraServer, TesseraServer],
                  ) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    a, b = instances
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        yield on_a, on_b


async def login_on(client: httpx.AsyncClient, email: str) -> tuple[str, str]:
    response = await login(client, email)
    assert response.status_code == 200, response.text
    return response.json()["access_token"], response.json()["session_id"]


async def introspect(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    response = await client.post("/auth/introspect", data={"token": token},
                                  headers=bearer(SERVICE_KEY))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def test_logout_on_one_instance_is_refused_on_the_other_at_once(clients) -> None:
    on_a, on_b = clients
    user = await register(on_a)
    token, _ = await login_on(on_a, user["email"])
    assert (await on_b.get("/me", headers=bearer(token))).status_code == 200
    assert (await on_a.post("/auth/logout", headers=bearer(token))).status_code == 204
    assert_problem(await on_b.get("/me", headers=bearer(token)), 401, "not_authenticated")
    assert await introspect(on_b, token) == {"active": False}

    first, _ = await login_on(on_b, user["email"])
    second, second_sid = await login_on(on_a, user["email"])
    assert (await on_a.delete(f"/auth/sessions/{second_sid}",
                              headers=bearer(first))).status_code == 204
    assert_problem(await on_b.get("/me", headers=bearer(second)), 401, "not_authenticated")
    assert (await on_b.post("/auth/logout-all", headers=bearer(first))).status_code == 204
    assert_problem(await on_a.get("/me", headers=bearer(first)), 401, "not_authenticated")
    assert await introspect(on_a, first) == {"active": False}


async def test_rotated_key_is_used_and_published_by_both_old_tokens_keep_working(
        clients, instances, env: dict[str, str]) -> None:
    on_a, on_b = clients
    a, b = instances
    user = await register(on_a)
    old_token, _ = await login_on(on_a, user["email"])
    old_kid = kid_of(old_token)

    rotated = await asyncio.to_thread(run_cli, env, "keys", "rotate")
    new_kid = rotated.stdout.strip().rsplit(" ", 1)[-1]
    assert new_kid != old_kid
    rotated_at = time.monotonic()

    async def published_by(client: httpx.AsyncClient) -> set[str]:
        return {k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]}

    # Within the key cache time, both instances sign with the new key and publish it.
    signed_by: dict[str, str] = {}
    while True:
        for name, client in (("a", on_a), ("b", on_b)):
            if name not in signed_by and kid_of((await login_on(client, user["email"]))[0]) \
                    == new_kid:
                signed_by[name] = f"{time.monotonic() - rotated_at:.2f} s"
        if len(signed_by) == 2 and new_kid in await published_by(on_a) \
                and new_kid in await published_by(on_b):
            break
        assert time.monotonic() - rotated_at < KEYS_CACHE_SECONDS + 3, signed_by
        await asyncio.sleep(0.05)
    print(f"\nrotated key {new_kid} in use on a after {signed_by['a']}, on b after {signed_by['b']}")

    new_on_a, _ = await login_on(on_a, user["email"])
    assert kid_of(new_on_a) == new_kid
    # A token signed on A with the new key verifies against B's JWKS, and is accepted on B.
    async with TesseraVerifier(b.url, jwks_min_refresh_seconds=0.2) as via_b, \
            TesseraVerifier(a.url, jwks_min_refresh_seconds=0.2) as via_a:
        assert (await via_b.verify(new_on_a)).kid == new_kid
        # Tokens signed with the old key keep working: still published, sessions still valid.
        assert (await via_b.verify(old_token)).kid == old_kid
        assert (await via_a.verify(old_token)).kid == old_kid
    assert old_kid in await published_by(on_a) and old_kid in await published_by(on_b)
    for client in (on_a, on_b):
        for token in (old_token, new_on_a):
            assert (await client.get("/me", headers=bearer(token))).status_code == 200
            assert (await introspect(client, token))["active"] is True


async def test_helper_following_one_instance_rejects_a_logout_on_the_other_within_a_second(
        clients, instances) -> None:
    on_a, _ = clients
    _, b = instances
    user = await register(on_a)
    delays: list[float] = []
    async with TesseraVerifier(b.url, service_key=SERVICE_KEY) as verifier:
        await verifier.follow_revocations()
        assert verifier.feed_live
        for _ in range(5):
            token, sid = await login_on(on_a, user["email"])
            assert (await verifier.verify(token)).sid == sid  # locally, against B's JWKS
            started = time.monotonic()
            await on_a.post("/auth/logout", headers=bearer(token))
            while True:
                try:
                    await verifier.verify(token)  # local: no request to tessera
                except TokenRejected:
                    break
                assert time.monotonic() - started < 5, "the logout never reached the helper"
                await asyncio.sleep(0.001)
            delays.append(time.monotonic() - started)
    print("\nlogout on A -> rejected by the helper following B's feed: "
          + ", ".join(f"{d * 1000:.1f}" for d in delays)
          + f" ms (median {statistics.median(delays) * 1000:.1f} ms)")
    assert max(delays) < 1.0
