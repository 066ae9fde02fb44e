"""Register -> login -> /me -> logout, over bearer and cookie, on one and two instances."""

from __future__ import annotations

import asyncio
from typing import Any

import jwt
from fastapi import FastAPI

from tests.conftest import (
    assert_problem,
    bearer,
    client_for,
    login,
    register,
    registered_token,
    running_app,
)


async def test_register_login_me_logout_then_bearer_token_is_refused(client) -> None:
    user = await register(client)
    assert set(user) >= {"id", "email", "created_at"}
    response = await login(client, user["email"].upper())  # emails compare case-insensitively
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 604800
    assert body["expires_at"].endswith("Z")
    token = body["access_token"]

    me = await client.get("/me", headers=bearer(token))
    assert me.status_code == 200
    assert me.json()["id"] == user["id"]
    assert me.json()["email"] == user["email"]
    assert me.headers["cache-control"] == "no-store"

    out = await client.post("/auth/logout", headers=bearer(token))
    assert out.status_code == 204
    refused = await client.get("/me", headers=bearer(token))
    assert_problem(refused, 401, "not_authenticated")
    assert refused.headers["www-authenticate"] == "Bearer"


async def test_cookie_login_then_logout_refuses_the_cookie(app: FastAPI) -> None:
    async with client_for(app) as client:
        user = await register(client)
        response = await login(client, user["email"])
        assert client.cookies.get("session") == response.json()["access_token"]
        csrf = client.cookies.get("csrf")
        assert (await client.get("/me")).status_code == 200
        session_cookie = client.cookies.get("session")

        out = await client.post("/auth/logout", headers={"X-CSRF-Token": csrf})
        assert out.status_code == 204
        assert client.cookies.get("session") is None  # expired by the response
    # The old cookie value, replayed, is refused.
    async with client_for(app, cookies={"session": session_cookie}) as replaying:
        assert_problem(await replaying.get("/me"), 401, "not_authenticated")


async def test_token_is_a_signed_jwt_with_the_contract_claims(app: FastAPI, client) -> None:
    user, token = await registered_token(client)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt" and header["kid"]
    jwks = (await client.get("/.well-known/jwks.json")).json()
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims = jwt.decode(token, key, algorithms=["EdDSA"], audience="tessera", issuer="tessera")
    assert claims["sub"] == user["id"]
    assert set(claims) >= {"iss", "aud", "sub", "sid", "iat", "exp", "jti"}
    assert claims["exp"] - claims["iat"] == 604800


async def test_logout_revokes_token_on_every_instance(base_settings: dict[str, Any]) -> None:
    async with running_app(**base_settings) as first, running_app(**base_settings) as second:
        async with client_for(first) as a, client_for(second) as b:
            user, token = await registered_token(a)
            assert (await b.get("/me", headers=bearer(token))).status_code == 200
            # Both instances publish the same keys (they share the database).
            assert (await a.get("/.well-known/jwks.json")).json() == \
                (await b.get("/.well-known/jwks.json")).json()
            assert (await a.post("/auth/logout", headers=bearer(token))).status_code == 204
            assert_problem(await b.get("/me", headers=bearer(token)), 401, "not_authenticated")


async def test_session_expires_with_its_ttl(base_settings: dict[str, Any]) -> None:
    async with running_app(**{**base_settings, "session_ttl_seconds": 2}) as short:
        async with client_for(short) as client:
            user = await register(client)
            response = await login(client, user["email"])
            assert response.json()["expires_in"] == 2
            token = response.json()["access_token"]
            assert (await client.get("/me", headers=bearer(token))).status_code == 200
            await asyncio.sleep(3.1)
            assert_problem(await client.get("/me", headers=bearer(token)), 401,
                           "not_authenticated")


async def test_oauth2_password_form_login(client) -> None:
    user = await register(client)
    response = await client.post("/auth/login", data={"username": user["email"],
                                                      "password": user["password"]})
    assert response.status_code == 200
    assert response.json()["token_type"] == "bearer"


async def test_unknown_email_and_wrong_password_answer_alike(client) -> None:
    user = await register(client)
    wrong = await login(client, user["email"], "not the password at all")
    unknown = await login(client, "nobody-" + user["email"], "not the password at all")
    a = assert_problem(wrong, 401, "invalid_credentials")
    b = assert_problem(unknown, 401, "invalid_credentials")
    assert a == b


async def test_logout_without_a_session_is_204(client) -> None:
    assert (await client.post("/auth/logout")).status_code == 204
    assert (await client.post("/auth/logout", headers=bearer("garbage"))).status_code == 204


async def test_forged_and_malformed_tokens_are_refused(client) -> None:
    user, token = await registered_token(client)
    head, payload, sig = token.split(".")
    forged = f"{head}.{payload}.{sig[:-4]}AAAA"
    for bad in (forged, "abc", "a.b.c", token + "x", "Bearer", "ey" * 3000):
        assert_problem(await client.get("/me", headers=bearer(bad)), 401, "not_authenticated")
    # A token signed by someone else's key, with the right claims, is refused too.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    claims = jwt.decode(token, options={"verify_signature": False})
    foreign = jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                         headers={"kid": jwt.get_unverified_header(token)["kid"]})
    assert_problem(await client.get("/me", headers=bearer(foreign)), 401, "not_authenticated")
    client.cookies.clear()
    assert_problem(await client.get("/me"), 401, "not_authenticated")
