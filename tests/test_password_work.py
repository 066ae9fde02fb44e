"""Issue 12.3 and 12.7: bcrypt work is bounded per account and per IP whatever the outcome
(successful logins and same-password changes included); per-IP limits bucket IPv6 by /64;
PATCH /me (which answers 409 email_taken) is limited per user; the hashing pool is fair
per account."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tessera.security.passwords import PasswordHasher
from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    client_for,
    login,
    new_email,
    register,
    running_app,
)


async def test_successful_logins_are_limited_per_account(base_settings: dict[str, Any]) -> None:
    async with running_app(**{**base_settings, "password_work_max_per_account_minute": 3}) as app:
        async with client_for(app) as client:
            user, other = await register(client), await register(client)
            for _ in range(3):
                assert (await login(client, user["email"])).status_code == 200
            limited = assert_problem(await login(client, user["email"]), 429,
                                     "too_many_attempts")
            assert limited["status"] == 429
            response = await login(client, user["email"])
            assert 1 <= int(response.headers["Retry-After"]) <= 60
            # another account from the same IP is not held up
            assert (await login(client, other["email"])).status_code == 200


async def test_same_password_changes_are_limited(base_settings: dict[str, Any]) -> None:
    async with running_app(**{**base_settings, "password_work_max_per_account_minute": 3}) as app:
        async with client_for(app) as client:
            user = await register(client)
            token = (await login(client, user["email"])).json()["access_token"]  # work 1
            body = {"current_password": PASSWORD, "new_password": PASSWORD}
            for _ in range(2):
                changed = await client.post("/me/password", json=body, headers=bearer(token))
                assert changed.status_code == 204, changed.text
            assert_problem(await client.post("/me/password", json=body, headers=bearer(token)),
                           429, "too_many_attempts")
            assert_problem(await client.request("DELETE", "/me", json={"password": PASSWORD},
                                                headers=bearer(token)), 429, "too_many_attempts")


async def test_password_work_is_limited_per_ip(base_settings: dict[str, Any]) -> None:
    async with running_app(**{**base_settings, "password_work_max_per_ip_minute": 4}) as app:
        async with client_for(app, ip="198.51.100.7") as client, \
                client_for(app, ip="198.51.100.8") as elsewhere:
            users = [await register(elsewhere) for _ in range(3)]
            for user in users[:2]:
                assert (await login(client, user["email"])).status_code == 200
            assert (await login(client, users[2]["email"], "wrong password!")).status_code == 401
            assert (await login(client, new_email())).status_code == 401  # unknown: still work
            assert_problem(await login(client, users[2]["email"]), 429, "too_many_attempts")
            assert (await login(elsewhere, users[2]["email"])).status_code == 200


async def test_ipv6_clients_are_limited_by_their_64(base_settings: dict[str, Any]) -> None:
    async with running_app(**{**base_settings, "register_max_per_ip": 2}) as app:
        async def register_from(ip: str) -> int:
            async with client_for(app, ip=ip) as client:
                return (await client.post("/auth/register", json={
                    "email": new_email(), "password": PASSWORD, "is_adult": True,
                })).status_code

        assert await register_from("2001:db8:1:2::1") == 201
        assert await register_from("2001:db8:1:2:ffff::9") == 201
        assert await register_from("2001:db8:1:2:0:0:0:abcd") == 429  # the same /64
        assert await register_from("2001:db8:1:3::1") == 201  # the next /64
        assert await register_from("::ffff:192.0.2.1") == 201  # IPv4-mapped: per address
        assert await register_from("::ffff:192.0.2.2") == 201


async def test_email_changes_are_limited_per_user(base_settings: dict[str, Any]) -> None:
    """PATCH /me answers 409 for a taken address, so it must not enumerate accounts freely."""
    async with running_app(**{**base_settings, "email_change_max_per_user": 3}) as app:
        async with client_for(app) as client:
            user = await register(client)
            token = (await login(client, user["email"])).json()["access_token"]
            others = [await register(client) for _ in range(2)]
            for other in others:
                assert_problem(await client.patch("/me", json={"email": other["email"],
                                                                    "current_password": PASSWORD},
                                                  headers=bearer(token)), 409, "email_taken")
            assert (await client.patch("/me", json={"email": new_email(),
                                                    "current_password": PASSWORD},
                                       headers=bearer(token))).status_code == 202
            assert_problem(await client.patch("/me", json={"email": new_email(),
                                                           "current_password": PASSWORD},
                                              headers=bearer(token)), 429, "too_many_attempts")


@pytest.mark.parametrize("rounds", [10])
async def test_the_hashing_pool_is_fair_per_account(rounds: int) -> None:
    """Five verifies of one account queue behind each other (at most one at a time here);
    another account's verify, started last, finishes before the fifth."""
    hasher = PasswordHasher(rounds, per_account=1)
    try:
        stored = await hasher.hash(PASSWORD)
        done: list[str] = []

        async def verify(name: str, account: str) -> None:
            await hasher.verify(PASSWORD, stored, account=account)
            done.append(name)

        flood = [asyncio.create_task(verify(f"a{i}", "a@example.com")) for i in range(5)]
        await asyncio.sleep(0)
        await verify("b", "b@example.com")
        await asyncio.gather(*flood)
        assert done.index("b") < done.index("a4"), done
        assert hasher.waiting_accounts() == 0  # nothing left behind per account
    finally:
        hasher.close()
