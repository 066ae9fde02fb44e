"""Passkeys (WebAuthn): registration, discoverable login, second factor after a password,
removal; stale challenges, foreign and cloned passkeys refused. The browser side is the
software authenticator in tests/webauthn_soft.py; tessera checks it with py_webauthn."""

from __future__ import annotations

from typing import Any

import httpx
import jwt
from fastapi import FastAPI
from sqlmodel import select

from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    client_for,
    login,
    registered_token,
    running_app,
)
from tests.test_mfa import enrol_totp, mfa_token_for, totp_code, user_with_totp
from tests.webauthn_soft import SoftAuthenticator, b64url_decode


async def add_passkey(client: httpx.AsyncClient, token: str, authenticator: SoftAuthenticator,
                      name: str = "laptop") -> dict[str, Any]:
    options = await client.post("/me/passkeys/options", headers=bearer(token))
    assert options.status_code == 200, options.text
    body = options.json()
    added = await client.post("/me/passkeys", headers=bearer(token), json={
        "current_password": PASSWORD, "challenge_id": body["challenge_id"], "credential": authenticator.create(body),
        "name": name})
    assert added.status_code == 201, added.text
    return dict(added.json())


async def factor(client: httpx.AsyncClient, authenticator: SoftAuthenticator) -> dict[str, Any]:
    """An enrolled passkey's assertion, as the second factor of a factor change."""
    proof = await assertion(client, authenticator)
    return {"assertion_challenge_id": proof["challenge_id"], "assertion": proof["credential"]}


async def request_options(client: httpx.AsyncClient) -> dict[str, Any]:
    options = await client.post("/auth/passkey/options", json={})
    assert options.status_code == 200, options.text
    return dict(options.json())


async def assertion(client: httpx.AsyncClient,
                    authenticator: SoftAuthenticator) -> dict[str, Any]:
    options = await request_options(client)
    return {"challenge_id": options["challenge_id"], "credential": authenticator.get(options)}


async def test_register_a_passkey_and_log_in_with_it_alone(client) -> None:
    user, token = await registered_token(client)
    options = (await client.post("/me/passkeys/options", headers=bearer(token))).json()
    assert options["rp"]["id"] == "127.0.0.1"
    assert options["authenticatorSelection"]["residentKey"] == "required"
    assert options["authenticatorSelection"]["userVerification"] == "preferred"
    handle = b64url_decode(options["user"]["id"])
    assert len(handle) == 32
    assert user["id"].encode() not in handle and user["email"].encode() not in handle
    authenticator = SoftAuthenticator()
    added = await client.post("/me/passkeys", headers=bearer(token), json={
        "current_password": PASSWORD, "challenge_id": options["challenge_id"], "credential": authenticator.create(options),
        "name": "my laptop"})
    assert added.status_code == 201, added.text
    assert set(added.json()) == {"id", "name", "created_at"}
    mfa = (await client.get("/me/mfa", headers=bearer(token))).json()
    assert [p["name"] for p in mfa["passkeys"]] == ["my laptop"]
    assert mfa["passkeys"][0]["last_used_at"] is None
    # The user id is the same random handle on every options call.
    again = (await client.post("/me/passkeys/options", headers=bearer(token))).json()
    assert again["user"]["id"] == options["user"]["id"]
    assert [c["id"] for c in again["excludeCredentials"]] == [authenticator.credential_b64]

    request = await request_options(client)
    assert "allowCredentials" not in request or request["allowCredentials"] == []
    client.cookies.clear()
    done = await client.post("/auth/passkey/login", json={
        "challenge_id": request["challenge_id"], "credential": authenticator.get(request)})
    assert done.status_code == 200, done.text
    body = done.json()
    assert client.cookies.get("session") == body["access_token"]
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == user["id"]
    assert claims["amr"] == ["hwk", "user", "mfa"]
    mfa = (await client.get("/me/mfa", headers=bearer(token))).json()
    assert mfa["passkeys"][0]["last_used_at"] is not None


async def test_a_used_or_unknown_challenge_is_refused(client) -> None:
    _, token = await registered_token(client)
    authenticator = SoftAuthenticator()
    await add_passkey(client, token, authenticator)
    request = await request_options(client)
    first = await client.post("/auth/passkey/login", json={
        "challenge_id": request["challenge_id"], "credential": authenticator.get(request)})
    assert first.status_code == 200
    replay = await client.post("/auth/passkey/login", json={
        "challenge_id": request["challenge_id"], "credential": authenticator.get(request)})
    assert_problem(replay, 401, "invalid_credentials")
    made_up = await client.post("/auth/passkey/login", json={
        "challenge_id": "never-issued", "credential": authenticator.get(request)})
    assert_problem(made_up, 401, "invalid_credentials")
    # A registration challenge is for registering, by that user only.
    creation = (await client.post("/me/passkeys/options", headers=bearer(token))).json()
    wrong_kind = await client.post("/auth/passkey/login", json={
        "challenge_id": creation["challenge_id"],
        "credential": authenticator.get({**creation, "rpId": creation["rp"]["id"]})})
    assert_problem(wrong_kind, 401, "invalid_credentials")
    used = await client.post("/me/passkeys", headers=bearer(token), json={
        **await factor(client, authenticator),
        "current_password": PASSWORD, "challenge_id": creation["challenge_id"],
        "credential": SoftAuthenticator().create(creation), "name": "late"})
    assert_problem(used, 400, "invalid_credential")


async def test_a_registration_challenge_is_bound_to_its_user(client) -> None:
    _, alice = await registered_token(client)
    _, mallory = await registered_token(client)
    options = (await client.post("/me/passkeys/options", headers=bearer(alice))).json()
    stolen = await client.post("/me/passkeys", headers=bearer(mallory), json={
        "current_password": PASSWORD, "challenge_id": options["challenge_id"],
        "credential": SoftAuthenticator().create(options), "name": "x"})
    assert_problem(stolen, 400, "invalid_credential")


async def test_a_foreign_passkey_is_refused(client) -> None:
    _, token = await registered_token(client)
    await add_passkey(client, token, SoftAuthenticator())
    stranger = SoftAuthenticator()  # never registered
    stranger.user_handle = None
    refused = await client.post("/auth/passkey/login", json=await assertion(client, stranger))
    assert_problem(refused, 401, "invalid_credentials")


async def test_another_users_passkey_is_no_second_factor(client) -> None:
    alice, alice_token = await registered_token(client)
    _, bob_token = await registered_token(client)
    await add_passkey(client, alice_token, SoftAuthenticator())
    bobs = SoftAuthenticator()
    await add_passkey(client, bob_token, bobs)
    mfa_token = await mfa_token_for(client, alice["email"])
    refused = await client.post("/auth/login/mfa", json={
        "mfa_token": mfa_token, **await assertion(client, bobs)})
    assert_problem(refused, 401, "invalid_code")


async def test_wrong_origin_or_rp_is_refused(client) -> None:
    _, token = await registered_token(client)
    authenticator = SoftAuthenticator()
    await add_passkey(client, token, authenticator)
    authenticator.origin = "https://evil.example"
    phished = await client.post("/auth/passkey/login",
                                json=await assertion(client, authenticator))
    assert_problem(phished, 401, "invalid_credentials")
    options = (await client.post("/me/passkeys/options", headers=bearer(token))).json()
    other_rp = SoftAuthenticator(rp_id="evil.example")
    authenticator.origin = "http://127.0.0.1:8000"
    refused = await client.post("/me/passkeys", headers=bearer(token), json={
        **await factor(client, authenticator), "current_password": PASSWORD,
        "challenge_id": options["challenge_id"], "credential": other_rp.create(options),
        "name": "x"})
    assert_problem(refused, 400, "invalid_credential")


async def test_a_cloned_authenticator_with_an_old_counter_is_refused(client) -> None:
    _, token = await registered_token(client)
    authenticator = SoftAuthenticator()
    await add_passkey(client, token, authenticator)
    for _ in range(2):
        ok = await client.post("/auth/passkey/login",
                               json=await assertion(client, authenticator))
        assert ok.status_code == 200
    authenticator.sign_count = 0  # a copy of the key made before those uses
    clone = await client.post("/auth/passkey/login", json=await assertion(client, authenticator))
    assert_problem(clone, 401, "invalid_credentials")


async def test_a_tampered_signature_is_refused(client) -> None:
    _, token = await registered_token(client)
    authenticator = SoftAuthenticator()
    await add_passkey(client, token, authenticator)
    body = await assertion(client, authenticator)
    body["credential"]["response"]["signature"] = body["credential"]["response"]["signature"][
        :-4] + "AAAA"
    assert_problem(await client.post("/auth/passkey/login", json=body), 401,
                   "invalid_credentials")
    garbage = await client.post("/auth/passkey/login", json={
        "challenge_id": (await request_options(client))["challenge_id"],
        "credential": {"id": 1, "response": "x"}})
    assert_problem(garbage, 401, "invalid_credentials")


async def test_the_same_passkey_cannot_be_registered_twice(client) -> None:
    _, token = await registered_token(client)
    authenticator = SoftAuthenticator()
    await add_passkey(client, token, authenticator)
    options = (await client.post("/me/passkeys/options", headers=bearer(token))).json()
    twice = await client.post("/me/passkeys", headers=bearer(token), json={
        **await factor(client, authenticator), "current_password": PASSWORD,
        "challenge_id": options["challenge_id"], "credential": authenticator.create(options),
        "name": "again"})
    assert_problem(twice, 400, "invalid_credential")


async def test_a_passkey_is_the_second_factor_after_a_password(client) -> None:
    user, token = await registered_token(client)
    authenticator = SoftAuthenticator()
    await add_passkey(client, token, authenticator)
    first = assert_problem(await login(client, user["email"]), 401, "mfa_required")
    assert first["methods"] == ["passkey"]
    done = await client.post("/auth/login/mfa", json={
        "mfa_token": first["mfa_token"], **await assertion(client, authenticator)})
    assert done.status_code == 200, done.text
    claims = jwt.decode(done.json()["access_token"], options={"verify_signature": False})
    assert claims["amr"] == ["pwd", "hwk", "user", "mfa"]


async def test_without_user_verification_a_passkey_is_one_factor(client) -> None:
    _, token = await registered_token(client)
    authenticator = SoftAuthenticator(user_verification=False)
    await add_passkey(client, token, authenticator)
    done = await client.post("/auth/passkey/login", json=await assertion(client, authenticator))
    assert done.status_code == 200
    claims = jwt.decode(done.json()["access_token"], options={"verify_signature": False})
    assert claims["amr"] == ["hwk"]
    # With TOTP also enrolled (which takes the passkey, as every factor change), that one
    # factor is not enough.
    secret, _ = await enrol_totp(client, token, **await assertion(client, authenticator))
    step = assert_problem(await client.post("/auth/passkey/login",
                                            json=await assertion(client, authenticator)),
                          401, "mfa_required")
    assert step["methods"] == ["totp", "recovery_code"]
    # The same passkey again is not a second factor.
    again = await client.post("/auth/login/mfa", json={
        "mfa_token": step["mfa_token"], **await assertion(client, authenticator)})
    assert_problem(again, 401, "invalid_code")
    finished = await client.post("/auth/login/mfa", json={
        "mfa_token": step["mfa_token"], "code": totp_code(secret, 1)})
    assert finished.status_code == 200, finished.text
    claims = jwt.decode(finished.json()["access_token"], options={"verify_signature": False})
    assert claims["amr"] == ["hwk", "otp", "mfa"]


async def test_removing_a_passkey_needs_password_and_factor(client) -> None:
    user, token = await registered_token(client)
    _, other_token = await registered_token(client)
    authenticator = SoftAuthenticator()
    key = await add_passkey(client, token, authenticator)
    others = await add_passkey(client, other_token, SoftAuthenticator())
    foreign = await client.request("DELETE", f"/me/passkeys/{others['id']}",
                                   headers=bearer(token), json={"current_password": PASSWORD})
    assert_problem(foreign, 404, "not_found")
    wrong = await client.request("DELETE", f"/me/passkeys/{key['id']}", headers=bearer(token),
                                 json={"current_password": "wrong password!"})
    assert_problem(wrong, 403, "invalid_credentials")
    no_factor = await client.request("DELETE", f"/me/passkeys/{key['id']}",
                                     headers=bearer(token), json={"current_password": PASSWORD})
    assert_problem(no_factor, 401, "mfa_required")
    removed = await client.request("DELETE", f"/me/passkeys/{key['id']}", headers=bearer(token),
                                   json={"current_password": PASSWORD,
                                         **await assertion(client, authenticator)})
    assert removed.status_code == 204, removed.text
    assert (await client.get("/me/mfa", headers=bearer(token))).json()["passkeys"] == []
    gone = await client.post("/auth/passkey/login", json=await assertion(client, authenticator))
    assert_problem(gone, 401, "invalid_credentials")
    assert (await login(client, user["email"])).status_code == 200  # one step again


async def test_export_lists_passkeys_and_deletion_removes_them(client, app: FastAPI) -> None:
    from tessera.stores.mfa import Passkey, WebauthnUser

    user, token = await registered_token(client)
    authenticator = SoftAuthenticator()
    await add_passkey(client, token, authenticator, name="phone")
    export = (await client.get("/me/export", headers=bearer(token))).json()
    assert [p["name"] for p in export["mfa"]["passkeys"]] == ["phone"]
    assert "public_key" not in str(export["mfa"])
    deleted = await client.request("DELETE", "/me", headers=bearer(token), json={
        "password": PASSWORD, **await assertion(client, authenticator)})
    assert deleted.status_code == 204, deleted.text
    async with app.state.tessera.db_factory() as db:
        assert (await db.exec(select(Passkey).where(Passkey.user_id == user["id"]))).all() == []
        assert await db.get(WebauthnUser, user["id"]) is None


async def test_erasing_a_minor_removes_every_factor(client, app: FastAPI) -> None:
    from tessera.stores.mfa import Passkey, RecoveryCode, TotpFactor
    from tests.test_rights import make_admin

    admin = await make_admin(app, client)
    user, token = await registered_token(client)
    authenticator = SoftAuthenticator()
    await add_passkey(client, token, authenticator)
    await enrol_totp(client, token, **await assertion(client, authenticator))
    marked = await client.post(f"/admin/users/{user['id']}/minor", headers=bearer(admin))
    assert marked.status_code == 204
    async with app.state.tessera.db_factory() as db:
        assert await db.get(TotpFactor, user["id"]) is None
        for table in (Passkey, RecoveryCode):
            assert (await db.exec(select(table).where(table.user_id == user["id"]))).all() == []
    gone = await client.post("/auth/passkey/login", json=await assertion(client, authenticator))
    assert_problem(gone, 401, "invalid_credentials")


def test_migration_0004_upgrades_and_downgrades(tmp_path, base_settings: dict[str, Any]) -> None:
    import asyncio

    from alembic import command

    from tessera.ops.migrate import alembic_config
    from tests.test_usage_segments import _execute

    url = base_settings["database_url"]
    if "postgres" in url:  # a database of this test's own: the session's one stays at head
        asyncio.run(_execute(url, "DROP DATABASE IF EXISTS tessera_mfa_migration_test",
                             "CREATE DATABASE tessera_mfa_migration_test", autocommit=True))
        url = url.rsplit("/", 1)[0] + "/tessera_mfa_migration_test"
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'migrate.db'}"
    command.upgrade(alembic_config(url), "0004")
    assert asyncio.run(_execute(url, "SELECT count(*) FROM passkeys")) == [(0,)]
    command.downgrade(alembic_config(url), "0002")
    command.upgrade(alembic_config(url), "0004")
    assert asyncio.run(_execute(url, "SELECT count(*) FROM mfa_totp")) == [(0,)]



async def add_with_the_contract_body(client: httpx.AsyncClient, token: str,
                                     name: str) -> httpx.Response:
    authenticator = SoftAuthenticator()
    options = (await client.post("/me/passkeys/options", headers=bearer(token))).json()
    return await client.post("/me/passkeys", headers=bearer(token), json={
        "challenge_id": options["challenge_id"], "credential": authenticator.create(options),
        "name": name})


async def test_a_fresh_login_adds_a_passkey_with_the_contract_body(client) -> None:
    """`{challenge_id, credential, name}` (shared/API.md): the session's login, seconds ago,
    gave the password; it need not be sent again."""
    _, token = await registered_token(client)
    added = await add_with_the_contract_body(client, token, "laptop")
    assert added.status_code == 201, added.text
    assert [k["name"] for k in (await client.get("/me/mfa", headers=bearer(token))).json()[
        "passkeys"]] == ["laptop"]


async def test_a_fresh_two_factor_login_adds_a_passkey_with_the_contract_body(client) -> None:
    user, _, secret, _ = await user_with_totp(client)
    done = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]),
        "code": totp_code(secret, 1)})  # the next step: enrolment used this one
    assert done.status_code == 200, done.text
    added = await add_with_the_contract_body(client, done.json()["access_token"], "phone")
    assert added.status_code == 201, added.text


async def test_an_old_session_must_send_the_password_to_add_a_passkey(
        base_settings: dict[str, Any]) -> None:
    """Past TESSERA_REAUTH_SECONDS (0 here: every session is old) the body needs the
    password: a stolen session cannot add a factor."""
    async with running_app(**{**base_settings, "reauth_seconds": 0}) as app, \
            client_for(app) as old:
        _, token = await registered_token(old)
        authenticator = SoftAuthenticator()
        options = (await old.post("/me/passkeys/options", headers=bearer(token))).json()
        without = await old.post("/me/passkeys", headers=bearer(token), json={
            "challenge_id": options["challenge_id"],
            "credential": authenticator.create(options), "name": "mallory"})
        assert_problem(without, 403, "reauthentication_required")
        assert (await old.get("/me/mfa", headers=bearer(token))).json()["passkeys"] == []
        options = (await old.post("/me/passkeys/options", headers=bearer(token))).json()
        with_password = await old.post("/me/passkeys", headers=bearer(token), json={
            "challenge_id": options["challenge_id"],
            "credential": authenticator.create(options), "name": "laptop",
            "current_password": PASSWORD})
        assert with_password.status_code == 201, with_password.text


async def test_a_stolen_session_alone_cannot_add_a_passkey(client) -> None:
    """Adding a factor is a sensitive change: the password, and the enrolled factor."""
    _, token = await registered_token(client)
    authenticator = SoftAuthenticator()
    options = (await client.post("/me/passkeys/options", headers=bearer(token))).json()
    wrong = await client.post("/me/passkeys", headers=bearer(token), json={
        "challenge_id": options["challenge_id"], "credential": authenticator.create(options),
        "name": "mallory", "current_password": "not the password"})
    assert_problem(wrong, 403, "invalid_credentials")
    secret = await enrol_totp(client, token)
    options = (await client.post("/me/passkeys/options", headers=bearer(token))).json()
    no_factor = await client.post("/me/passkeys", headers=bearer(token), json={
        "challenge_id": options["challenge_id"], "credential": authenticator.create(options),
        "name": "mallory", "current_password": PASSWORD})
    assert_problem(no_factor, 401, "mfa_required")
    # A recent login that used one factor (TOTP came after it) does not stand for two.
    options = (await client.post("/me/passkeys/options", headers=bearer(token))).json()
    recent_one_factor = await client.post("/me/passkeys", headers=bearer(token), json={
        "challenge_id": options["challenge_id"], "credential": authenticator.create(options),
        "name": "mallory"})
    assert_problem(recent_one_factor, 401, "mfa_required")
    assert (await client.get("/me/mfa", headers=bearer(token))).json()["passkeys"] == []
    assert secret
