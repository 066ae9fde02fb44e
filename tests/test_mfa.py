"""Second factors: TOTP (codes from pyotp and oathtool, as a user's app makes them), recovery
codes, the two-step login, amr/auth_time, and sensitive changes that need the factor."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pyotp
import pytest
from fastapi import FastAPI
from sqlmodel import select

from tests.conftest import (
    PASSWORD,
    SERVICE_KEY,
    assert_problem,
    bearer,
    client_for,
    login,
    register,
    registered_token,
)


def totp_code(secret: str, steps_ahead: int = 0) -> str:
    """The code an authenticator app shows now (or `steps_ahead` periods later: within the
    one step of clock drift tessera allows)."""
    return pyotp.TOTP(secret).at(time.time() + 30 * steps_ahead)


async def enrol_totp(client: httpx.AsyncClient, token: str,
                     **factor: Any) -> tuple[str, list[str]]:
    started = await client.post("/me/mfa/totp", json={"current_password": PASSWORD, **factor},
                                headers=bearer(token))
    assert started.status_code == 201, started.text
    secret = started.json()["secret"]
    confirmed = await client.post("/me/mfa/totp/confirm", json={"code": totp_code(secret)},
                                  headers=bearer(token))
    assert confirmed.status_code == 200, confirmed.text
    return secret, confirmed.json()["recovery_codes"]


async def user_with_totp(client: httpx.AsyncClient) -> tuple[dict[str, Any], str, str,
                                                              list[str]]:
    user, token = await registered_token(client)
    secret, codes = await enrol_totp(client, token)
    return user, token, secret, codes


async def mfa_token_for(client: httpx.AsyncClient, email: str) -> str:
    body = assert_problem(await login(client, email), 401, "mfa_required")
    return str(body["mfa_token"])


async def test_totp_enrolment_then_login_takes_two_steps(client) -> None:
    user, token = await registered_token(client)
    started = await client.post("/me/mfa/totp", json={"current_password": PASSWORD},
                                headers=bearer(token))
    assert started.status_code == 201
    assert started.headers["cache-control"] == "no-store"
    secret, uri = started.json()["secret"], started.json()["otpauth_uri"]
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    query = parse_qs(parts.query)
    assert query["secret"] == [secret] and query["issuer"] == ["tessera"]
    assert pyotp.parse_uri(uri).secret == secret  # an authenticator app reads it back
    mfa = (await client.get("/me/mfa", headers=bearer(token))).json()
    assert mfa == {"totp": False, "passkeys": [], "recovery_codes_left": 0}
    # Not active before it is confirmed: the login is still one step.
    assert (await login(client, user["email"])).status_code == 200

    wrong = await client.post("/me/mfa/totp/confirm", json={"code": "000000"},
                              headers=bearer(token))
    assert_problem(wrong, 400, "invalid_code")
    confirmed = await client.post("/me/mfa/totp/confirm", json={"code": totp_code(secret)},
                                  headers=bearer(token))
    assert confirmed.status_code == 200
    codes = confirmed.json()["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    mfa = (await client.get("/me/mfa", headers=bearer(token))).json()
    assert mfa == {"totp": True, "passkeys": [], "recovery_codes_left": 10}

    client.cookies.clear()
    first_step = await login(client, user["email"])
    first = assert_problem(first_step, 401, "mfa_required")
    assert first["methods"] == ["totp", "recovery_code"]
    assert "access_token" not in first
    assert not any(c.startswith(("session=", "csrf="))
                   for c in first_step.headers.get_list("set-cookie"))
    done = await client.post("/auth/login/mfa", json={
        "mfa_token": first["mfa_token"], "code": totp_code(secret, 1)})
    assert done.status_code == 200, done.text
    body = done.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "expires_at",
                         "session_id", "csrf_token"}
    assert client.cookies.get("session") == body["access_token"]
    assert client.cookies.get("csrf") == body["csrf_token"]
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["amr"] == ["pwd", "otp", "mfa"]
    assert abs(claims["auth_time"] - time.time()) < 60
    assert (await client.get("/me", headers=bearer(body["access_token"]))).status_code == 200

    # The mfa_token is single use.
    again = await client.post("/auth/login/mfa", json={
        "mfa_token": first["mfa_token"], "code": codes[0]})
    assert_problem(again, 401, "invalid_token")


async def test_a_replayed_totp_code_is_refused(client) -> None:
    user, _, secret, _ = await user_with_totp(client)
    code = totp_code(secret, 1)
    ok = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": code})
    assert ok.status_code == 200
    replay = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": code})
    assert_problem(replay, 401, "invalid_code")
    # An earlier step's code is refused too, though still within the drift window.
    older = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": totp_code(secret)})
    assert_problem(older, 401, "invalid_code")


async def test_codes_outside_one_step_of_drift_are_refused(client) -> None:
    user, _, secret, _ = await user_with_totp(client)
    for steps in (3, -3):
        late = await client.post("/auth/login/mfa", json={
            "mfa_token": await mfa_token_for(client, user["email"]),
            "code": totp_code(secret, steps)})
        assert_problem(late, 401, "invalid_code")


async def test_one_code_sent_twice_at_once_logs_in_once(client, app: FastAPI) -> None:
    user, _, secret, _ = await user_with_totp(client)
    code = totp_code(secret, 1)
    tokens = [await mfa_token_for(client, user["email"]) for _ in range(4)]
    async with client_for(app) as other:
        answers = await asyncio.gather(*(
            (client if i % 2 else other).post("/auth/login/mfa",
                                              json={"mfa_token": tok, "code": code})
            for i, tok in enumerate(tokens)))
    assert sorted(a.status_code for a in answers) == [200, 401, 401, 401]


def oathtool_code(secret: str, at: int) -> str:
    return subprocess.run(["oathtool", "--totp", "-b", secret, "-N", f"@{at}"],
                          capture_output=True, text=True, check=True).stdout.strip()


async def test_code_from_oathtool_is_accepted(client) -> None:
    if shutil.which("oathtool") is None:
        pytest.skip("oathtool is not installed (Debian package oathtool)")
    user, _, secret, _ = await user_with_totp(client)
    code = oathtool_code(secret, int(time.time()) + 30)  # the next step: enrolment used this
    ok = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": code})
    assert ok.status_code == 200, ok.text


async def test_a_recovery_code_works_once(client) -> None:
    user, token, _, codes = await user_with_totp(client)
    used = codes[3]
    ok = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]),
        "code": used.upper().replace("-", " ")})  # typed off paper: case and spacing vary
    assert ok.status_code == 200, ok.text
    claims = jwt.decode(ok.json()["access_token"], options={"verify_signature": False})
    assert claims["amr"] == ["pwd", "otp", "mfa"]
    reused = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": used})
    assert_problem(reused, 401, "invalid_code")
    mfa = (await client.get("/me/mfa", headers=bearer(token))).json()
    assert mfa["recovery_codes_left"] == 9


async def test_wrong_codes_are_limited_per_mfa_token(client) -> None:
    user, _, secret, _ = await user_with_totp(client)
    mfa_token = await mfa_token_for(client, user["email"])
    for _ in range(5):
        wrong = await client.post("/auth/login/mfa", json={"mfa_token": mfa_token,
                                                           "code": "123456"})
        assert_problem(wrong, 401, "invalid_code")
    limited = await client.post("/auth/login/mfa", json={"mfa_token": mfa_token,
                                                         "code": totp_code(secret, 1)})
    assert_problem(limited, 429, "too_many_attempts")
    assert int(limited.headers["retry-after"]) >= 1
    # A new mfa_token (the password again) may still finish.
    ok = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": totp_code(secret, 1)})
    assert ok.status_code == 200


async def test_wrong_codes_are_limited_per_account(client) -> None:
    user, _, secret, _ = await user_with_totp(client)
    for _ in range(5):  # two codes per token: the per-token limit is never reached
        mfa_token = await mfa_token_for(client, user["email"])
        for _ in range(2):
            wrong = await client.post("/auth/login/mfa", json={"mfa_token": mfa_token,
                                                               "code": "999999"})
            assert_problem(wrong, 401, "invalid_code")
    limited = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": totp_code(secret, 1)})
    assert_problem(limited, 429, "too_many_attempts")


async def test_unknown_mfa_token_and_missing_code(client) -> None:
    assert_problem(await client.post("/auth/login/mfa", json={"mfa_token": "nope",
                                                              "code": "123456"}),
                   401, "invalid_token")
    user, _, _, _ = await user_with_totp(client)
    missing = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"])})
    assert_problem(missing, 422, "validation_error")


async def test_a_password_change_voids_pending_mfa_tokens(client) -> None:
    user, token, secret, _ = await user_with_totp(client)
    mfa_token = await mfa_token_for(client, user["email"])
    changed = await client.post("/me/password", headers=bearer(token), json={
        "current_password": PASSWORD, "new_password": "another long password",
        "code": totp_code(secret, 1)})
    assert changed.status_code == 204, changed.text
    stale = await client.post("/auth/login/mfa", json={"mfa_token": mfa_token,
                                                       "code": totp_code(secret, 1)})
    assert_problem(stale, 401, "invalid_token")


async def test_disable_totp_needs_password_and_code(client) -> None:
    user, token, secret, _ = await user_with_totp(client)
    no_code = await client.request("DELETE", "/me/mfa/totp", headers=bearer(token),
                                   json={"current_password": PASSWORD})
    assert_problem(no_code, 401, "mfa_required")
    wrong_password = await client.request("DELETE", "/me/mfa/totp", headers=bearer(token),
                                          json={"current_password": "wrong password!",
                                                "code": totp_code(secret, 1)})
    assert_problem(wrong_password, 403, "invalid_credentials")
    wrong_code = await client.request("DELETE", "/me/mfa/totp", headers=bearer(token),
                                      json={"current_password": PASSWORD, "code": "000000"})
    assert_problem(wrong_code, 401, "invalid_code")
    done = await client.request("DELETE", "/me/mfa/totp", headers=bearer(token),
                                json={"current_password": PASSWORD,
                                      "code": totp_code(secret, 1)})
    assert done.status_code == 204
    assert (await client.get("/me/mfa", headers=bearer(token))).json() == {
        "totp": False, "passkeys": [], "recovery_codes_left": 0}
    assert (await login(client, user["email"])).status_code == 200


async def test_new_recovery_codes_replace_the_old_set(client) -> None:
    user, token, secret, old = await user_with_totp(client)
    no_code = await client.post("/me/mfa/recovery-codes", headers=bearer(token),
                                json={"current_password": PASSWORD})
    assert_problem(no_code, 401, "mfa_required")
    fresh = await client.post("/me/mfa/recovery-codes", headers=bearer(token),
                              json={"current_password": PASSWORD, "code": old[0]})
    assert fresh.status_code == 200, fresh.text
    new = fresh.json()["recovery_codes"]
    assert len(new) == 10 and not set(new) & set(old)
    stale = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": old[1]})
    assert_problem(stale, 401, "invalid_code")
    ok = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": new[1]})
    assert ok.status_code == 200


async def test_enrolling_again_while_active_is_refused(client) -> None:
    _, token, _, _ = await user_with_totp(client)
    again = await client.post("/me/mfa/totp", json={"current_password": PASSWORD},
                              headers=bearer(token))
    assert_problem(again, 409, "totp_already_enabled")
    wrong = await client.post("/me/mfa/totp", json={"current_password": "wrong password!"},
                              headers=bearer(token))
    assert_problem(wrong, 403, "invalid_credentials")


async def test_password_change_and_deletion_need_the_factor(client) -> None:
    user, token, secret, codes = await user_with_totp(client)
    body = {"current_password": PASSWORD, "new_password": "a brand new password"}
    assert_problem(await client.post("/me/password", json=body, headers=bearer(token)),
                   401, "mfa_required")
    assert_problem(await client.post("/me/password", json={**body, "code": "000000"},
                                     headers=bearer(token)), 401, "invalid_code")
    assert (await client.post("/me/password", json={**body, "code": codes[0]},
                              headers=bearer(token))).status_code == 204
    gone = await client.request("DELETE", "/me", json={"password": body["new_password"]},
                                headers=bearer(token))
    assert_problem(gone, 401, "mfa_required")
    deleted = await client.request("DELETE", "/me", headers=bearer(token), json={
        "password": body["new_password"], "code": totp_code(secret, 1)})
    assert deleted.status_code == 204
    assert_problem(await login(client, user["email"], body["new_password"]), 401,
                   "invalid_credentials")


async def test_secrets_are_encrypted_and_codes_hashed_at_rest(client, app: FastAPI) -> None:
    from tessera.stores.mfa import RecoveryCode, TotpFactor

    user, _, secret, codes = await user_with_totp(client)
    async with app.state.tessera.db_factory() as db:
        row = await db.get(TotpFactor, user["id"])
        stored = (await db.exec(select(RecoveryCode)
                                .where(RecoveryCode.user_id == user["id"]))).all()
    assert row is not None and secret not in row.secret_enc
    assert len(stored) == 10
    text = " ".join(r.code_hash for r in stored)
    assert not any(c.replace("-", "") in text or c in text for c in codes)


async def test_export_lists_factors_without_secrets_and_deletion_removes_them(
        client, app: FastAPI) -> None:
    from tessera.stores.mfa import RecoveryCode, TotpFactor

    user, token, secret, codes = await user_with_totp(client)
    export = await client.get("/me/export", headers=bearer(token))
    assert export.status_code == 200
    mfa = export.json()["mfa"]
    assert mfa["totp"]["confirmed_at"] and mfa["recovery_codes"]["left"] == 10
    assert mfa["passkeys"] == []
    assert secret not in export.text and not any(c in export.text for c in codes)
    redis = app.state.tessera.redis
    await mfa_token_for(client, user["email"])  # a login left at its second step
    pending = [k async for k in redis.scan_iter(match=f"tessera:{{{user['id']}}}:mfa*")]
    assert pending  # the mfa_token (its record holds MACs of codes) and its list
    guard = f"tessera:{{{user['id']}}}:totp-steps"
    assert await redis.exists(guard)  # the enrolment's code was spent there
    deleted = await client.request("DELETE", "/me", headers=bearer(token), json={
        "password": PASSWORD, "code": codes[0]})
    assert deleted.status_code == 204
    async with app.state.tessera.db_factory() as db:
        assert await db.get(TotpFactor, user["id"]) is None
        assert (await db.exec(select(RecoveryCode)
                              .where(RecoveryCode.user_id == user["id"]))).all() == []
    assert await redis.exists(*pending) == 0
    # No key of the user's is left but the auth epoch (a bare counter, docs/security.md).
    left = [k async for k in redis.scan_iter(match=f"tessera:{{{user['id']}}}:*")]
    assert left == [f"tessera:{{{user['id']}}}:epoch"], left


async def test_tokens_and_introspection_say_how_the_user_authenticated(client) -> None:
    user, token = await registered_token(client)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["amr"] == ["pwd"] and claims["auth_time"] == claims["iat"]
    answer = (await client.post("/auth/introspect", data={"token": token},
                                headers=bearer(SERVICE_KEY))).json()
    assert answer["amr"] == ["pwd"] and answer["auth_time"] == claims["iat"]
    secret, _ = await enrol_totp(client, token)
    done = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": totp_code(secret, 1)})
    strong = done.json()["access_token"]
    answer = (await client.post("/auth/introspect", data={"token": strong},
                                headers=bearer(SERVICE_KEY))).json()
    assert answer["active"] is True and answer["amr"] == ["pwd", "otp", "mfa"]


def test_session_records_written_before_amr_still_decode() -> None:
    from tessera.stores.sessions import _decode

    old = ('{"sid": "s1", "user_id": "u1", "token_hash": "h", "created_at": 1, '
           '"expires_at": 2, "user_agent": null}')
    record = _decode(old)
    assert record is not None and record.amr == [] and record.auth_time is None


@pytest.mark.parametrize("body", [{"code": 123456}, {"code": "1" * 65}, {"code": ""}])
async def test_bad_confirm_bodies_are_422(client, body: dict[str, Any]) -> None:
    _, token = await registered_token(client)
    response = await client.post("/me/mfa/totp/confirm", json=body, headers=bearer(token))
    assert_problem(response, 422, "validation_error")


async def test_confirm_without_enrolment_is_409(client) -> None:
    _, token = await registered_token(client)
    response = await client.post("/me/mfa/totp/confirm", json={"code": "123456"},
                                 headers=bearer(token))
    assert_problem(response, 409, "no_pending_totp")


async def test_factors_need_a_login(client) -> None:
    assert_problem(await client.get("/me/mfa"), 401, "not_authenticated")
    user = await register(client)
    assert user["id"]
