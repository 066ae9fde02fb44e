"""Issue 12.1: a login in flight must not outlive the change that should end it.

Each test holds a real login inside its password verify (after the user row was read, before
the session is written), runs the competing change to completion, then lets the login go on:
no session of the old credentials or account state may survive, by bearer, by introspection
or through tessera_verify. Real Redis and database; only the ordering is controlled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import update

from tessera.stores.models import User
from tessera_verify import TesseraVerifier, TokenRejected
from tests.conftest import PASSWORD, SERVICE_KEY, bearer, login, register, registered_token


@asynccontextmanager
async def held_verify(app: FastAPI) -> AsyncIterator[tuple[asyncio.Event, asyncio.Event]]:
    """The next password verify runs, then waits for `release` (`reached` says it got there).
    Every other verify meanwhile runs straight through."""
    hasher = app.state.tessera.hasher
    original = hasher.verify
    reached, release = asyncio.Event(), asyncio.Event()
    armed = [True]

    async def verify(password: str, stored_hash: str | None, **kw: Any) -> Any:
        result = await original(password, stored_hash, **kw)
        if armed[0]:
            armed[0] = False
            reached.set()
            await release.wait()
        return result

    hasher.verify = verify
    try:
        yield reached, release
    finally:
        hasher.verify = original


async def race(app: FastAPI, client: httpx.AsyncClient, email: str,
               change: Callable[[], Awaitable[None]]) -> httpx.Response:
    """A login of `email` whose session is written only after `change` completed."""
    async with held_verify(app) as (reached, release):
        in_flight = asyncio.create_task(login(client, email))
        await asyncio.wait_for(reached.wait(), 10)
        await change()
        release.set()
        return await asyncio.wait_for(in_flight, 10)


async def introspect(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    response = await client.post("/auth/introspect", data={"token": token},
                                 headers=bearer(SERVICE_KEY))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def assert_no_session_of(app: FastAPI, client: httpx.AsyncClient,
                               raced: httpx.Response, user_id: str, *,
                               kept: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    sessions = {r.sid for r in await app.state.tessera.sessions.list(user_id)}
    assert sessions <= kept, "a raced login left a session"
    if raced.status_code == 200:  # before the fix: check the token is dead everywhere
        token = raced.json()["access_token"]
        assert (await client.get("/me", headers=bearer(token))).status_code == 401
        assert await introspect(client, token) == {"active": False}


async def test_a_login_racing_a_password_change_gets_no_session(app: FastAPI,
                                                                client: httpx.AsyncClient) -> None:
    user, token = await registered_token(client)
    me = (await client.get("/me", headers=bearer(token))).json()

    async def change() -> None:
        changed = await client.post("/me/password", headers=bearer(token), json={
            "current_password": PASSWORD, "new_password": "a brand new passphrase"})
        assert changed.status_code == 204, changed.text

    raced = await race(app, client, user["email"], change)
    assert raced.status_code == 401, raced.text
    assert raced.json()["code"] == "invalid_credentials"
    await assert_no_session_of(app, client, raced, me["id"],
                               kept={(await introspect(client, token))["sid"]})
    # the new password still logs in
    assert (await login(client, user["email"], "a brand new passphrase")).status_code == 200


async def test_a_login_racing_deactivation_gets_none_and_reactivation_revives_nothing(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    user, token = await registered_token(client)
    admin_user, admin = await registered_token(client)
    async with app.state.tessera.db_factory() as db:
        await db.exec(update(User).where(User.id == admin_user["id"]).values(is_admin=True))
        await db.commit()

    async def change() -> None:
        assert (await client.post("/me/deactivate", headers=bearer(token))).status_code == 204

    raced = await race(app, client, user["email"], change)
    assert raced.status_code == 403, raced.text
    assert raced.json()["code"] == "account_inactive"
    reactivated = await client.post(f"/admin/users/{user['id']}/reactivate",
                                    headers=bearer(admin))
    assert reactivated.status_code == 204
    await assert_no_session_of(app, client, raced, user["id"])


async def test_reactivation_ends_a_session_that_raced_the_deactivation(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """Belt and braces: a session that somehow outlived a deactivation (written straight to
    Redis here) does not come back to life with the account."""

    user, token = await registered_token(client)
    admin_user, admin = await registered_token(client)
    async with app.state.tessera.db_factory() as db:
        await db.exec(update(User).where(User.id == admin_user["id"]).values(is_admin=True))
        await db.commit()
    assert (await client.post("/me/deactivate", headers=bearer(token))).status_code == 204
    t = app.state.tessera
    async with t.db_factory() as db:
        row = await db.get(User, user["id"])
        assert row is not None
        issued = await t.logins.open(row, None, epoch=await t.sessions.epoch(user["id"]))
    assert issued is not None
    assert (await client.get("/me", headers=bearer(issued.token))).status_code == 401
    assert (await client.post(f"/admin/users/{user['id']}/reactivate",
                              headers=bearer(admin))).status_code == 204
    assert (await client.get("/me", headers=bearer(issued.token))).status_code == 401
    assert await introspect(client, issued.token) == {"active": False}


async def test_a_login_racing_account_deletion_gets_no_session(app: FastAPI,
                                                               client: httpx.AsyncClient) -> None:
    user, token = await registered_token(client)

    async def change() -> None:
        deleted = await client.request("DELETE", "/me", headers=bearer(token),
                                       json={"password": PASSWORD})
        assert deleted.status_code == 204, deleted.text

    raced = await race(app, client, user["email"], change)
    assert raced.status_code == 401, raced.text
    await assert_no_session_of(app, client, raced, user["id"])


async def test_a_login_racing_a_minor_erasure_gets_no_session(app: FastAPI,
                                                              client: httpx.AsyncClient) -> None:
    user = await register(client)
    admin_user, admin = await registered_token(client)
    async with app.state.tessera.db_factory() as db:
        await db.exec(update(User).where(User.id == admin_user["id"]).values(is_admin=True))
        await db.commit()

    async def change() -> None:
        erased = await client.post(f"/admin/users/{user['id']}/minor", headers=bearer(admin))
        assert erased.status_code == 204, erased.text

    raced = await race(app, client, user["email"], change)
    assert raced.status_code in (401, 403), raced.text
    await assert_no_session_of(app, client, raced, user["id"])


async def test_tessera_verify_refuses_a_raced_token(app: FastAPI,
                                                    client: httpx.AsyncClient) -> None:
    """The downstream helper, introspecting, refuses whatever a race could have produced."""
    user, token = await registered_token(client)

    async def change() -> None:
        changed = await client.post("/me/password", headers=bearer(token), json={
            "current_password": PASSWORD, "new_password": "another new passphrase"})
        assert changed.status_code == 204

    raced = await race(app, client, user["email"], change)
    async with TesseraVerifier("http://testserver", http_client=client,
                               service_key=SERVICE_KEY, introspect=True) as verifier:
        assert (await verifier.verify(token)).sub == user["id"]  # the changer's own session
        if raced.status_code == 200:
            with pytest.raises(TokenRejected):
                await verifier.verify(raced.json()["access_token"])
    assert raced.status_code == 401


async def test_concurrent_logins_against_one_password_change_leave_no_old_session(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """Unordered: three looping logins against one change; whatever interleaving happens,
    every session left was issued for the new password or is the changer's own."""
    user, token = await registered_token(client)
    stop = asyncio.Event()
    issued: list[str] = []

    async def loop_logins() -> None:
        while not stop.is_set():
            response = await login(client, user["email"])
            if response.status_code == 200:
                issued.append(response.json()["access_token"])

    loops = [asyncio.create_task(loop_logins()) for _ in range(3)]
    await asyncio.sleep(0.05)
    changed = await client.post("/me/password", headers=bearer(token), json={
        "current_password": PASSWORD, "new_password": "a third new passphrase"})
    assert changed.status_code == 204
    stop.set()
    await asyncio.gather(*loops)
    for old in issued:
        assert (await client.get("/me", headers=bearer(old))).status_code == 401
