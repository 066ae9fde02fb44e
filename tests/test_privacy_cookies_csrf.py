"""P3: cookies serve login only; DNT/GPC get no non-essential cookie and no tracking; CSRF."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI

from tests.conftest import assert_problem, client_for, login, register, running_app


def set_cookies(response) -> dict[str, str]:
    return {c.split("=", 1)[0]: c for c in response.headers.get_list("set-cookie")}


async def test_login_cookie_attributes_in_development(app: FastAPI) -> None:
    async with client_for(app) as client:
        user = await register(client)
        response = await login(client, user["email"])
        cookies = set_cookies(response)
    session, csrf = cookies["session"], cookies["csrf"]
    for attr in ("Path=/", "SameSite=Lax", "Max-Age=604800"):
        assert attr in session and attr in csrf
    assert "HttpOnly" in session and "HttpOnly" not in csrf
    assert "Secure" not in session and "Domain" not in session
    assert response.json()["access_token"] in session


async def test_secure_cookies_carry_the_host_prefix(base_settings: dict[str, Any]) -> None:
    async with running_app(**{**base_settings, "cookie_secure": True}) as secure_app:
        async with client_for(secure_app, base_url="https://testserver") as client:
            user = await register(client)
            response = await login(client, user["email"])
            cookies = set_cookies(response)
            assert set(cookies) >= {"__Host-session", "__Host-csrf"}
            assert "session" not in cookies and "csrf" not in cookies
            for c in (cookies["__Host-session"], cookies["__Host-csrf"]):
                assert "Secure" in c and "Path=/" in c and "Domain" not in c
            assert "Strict-Transport-Security" in response.headers
            # The cookie authenticates (with its __Host- name).
            assert (await client.get("/me")).status_code == 200


@pytest.mark.parametrize("header", [{"DNT": "1"}, {"Sec-GPC": "1"}])
async def test_opt_out_gets_no_visitor_cookie_and_tk_n(app: FastAPI, header) -> None:
    async with client_for(app) as client:
        user = await register(client)
        response = await login(client, user["email"], **header)
        assert response.status_code == 200
        cookies = set_cookies(response)
        assert "visitor" not in cookies
        assert {"session", "csrf"} <= set(cookies)  # essential cookies stay
        assert response.headers["tk"] == "N"
        assert "DNT" in response.headers["vary"] and "Sec-GPC" in response.headers["vary"]
        health = await client.get("/healthz", headers=header)
        assert health.headers["tk"] == "N" and "set-cookie" not in health.headers


async def test_tracked_request_gets_visitor_cookie_once(app: FastAPI) -> None:
    async with client_for(app) as client:
        first = await client.get("/policy")
        assert first.headers["tk"] == "T"
        visitor = set_cookies(first)["visitor"]
        assert "Max-Age=31536000" in visitor
        second = await client.get("/policy")  # the client now sends the cookie back
        assert "visitor" not in set_cookies(second)
        assert second.headers["tk"] == "T"
        dnt0 = await client.get("/policy", headers={"DNT": "0"})
        assert dnt0.headers["tk"] == "T"


async def test_operator_endpoints_set_no_visitor_cookie(app: FastAPI) -> None:
    async with client_for(app) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            response = await client.get(path)
            assert "set-cookie" not in response.headers, path
            assert response.headers["tk"] == "N", path


async def test_cookie_request_without_csrf_header_is_refused(app: FastAPI) -> None:
    async with client_for(app) as client:
        user = await register(client)
        await login(client, user["email"])
        response = await client.post("/auth/logout-all")
        assert_problem(response, 403, "csrf_failed")
        wrong = await client.post("/auth/logout-all", headers={"X-CSRF-Token": "nope"})
        assert_problem(wrong, 403, "csrf_failed")
        # The session survived the refused requests.
        assert (await client.get("/me")).status_code == 200
        # A cookie-authenticated logout needs its token too.
        assert_problem(await client.post("/auth/logout"), 403, "csrf_failed")
        ok = await client.post("/auth/logout-all",
                               headers={"X-CSRF-Token": client.cookies["csrf"]})
        assert ok.status_code == 204


async def test_csrf_value_from_another_session_fails(app: FastAPI) -> None:
    async with client_for(app) as a, client_for(app) as b:
        user = await register(a)
        await login(a, user["email"])
        await login(b, user["email"])
        other_csrf = b.cookies["csrf"]
        # Header and cookie agree, but they belong to another session.
        a.cookies.set("csrf", other_csrf)
        response = await a.post("/auth/logout-all", headers={"X-CSRF-Token": other_csrf})
        assert_problem(response, 403, "csrf_failed")


async def test_bearer_requests_need_no_csrf(app: FastAPI) -> None:
    async with client_for(app) as client:
        user = await register(client)
        token = (await login(client, user["email"])).json()["access_token"]
    async with client_for(app) as bare:
        response = await bare.post("/auth/logout", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 204


async def test_csrf_token_is_also_given_to_the_page(app: FastAPI) -> None:
    async with client_for(app) as client:
        user = await register(client)
        body = (await login(client, user["email"])).json()
        assert body["csrf_token"] == client.cookies["csrf"]
        again = await client.get("/auth/csrf")
        assert again.json() == {"csrf_token": body["csrf_token"]}
        assert again.headers["cache-control"] == "no-store"
        ok = await client.post("/auth/logout-all", headers={"X-CSRF-Token": body["csrf_token"]})
        assert ok.status_code == 204
        assert_problem(await client.get("/auth/csrf"), 401, "not_authenticated")


async def test_a_restricted_user_is_untracked_on_every_answer(app: FastAPI) -> None:
    """The tracking decision comes first: a 404, a CSRF failure and a public route of a
    restricted user's cookie session say Tk: N and set no visitor cookie."""
    async with client_for(app) as client:
        user = await register(client)
        await login(client, user["email"])
        csrf = client.cookies["csrf"]
        restricted = await client.put("/me/restrictions", headers={"X-CSRF-Token": csrf}, json={
            "restrict_processing": False, "object_to_processing": True})
        assert restricted.status_code == 200, restricted.text
        client.cookies.delete("visitor")
        for response in (await client.get("/no-such-route"),
                         await client.post("/auth/logout-all"),  # no CSRF header: 403
                         await client.get("/policy")):
            assert response.headers["tk"] == "N", (response.status_code, response.text)
            assert "visitor" not in set_cookies(response)
        assert (await client.post("/auth/logout-all")).status_code == 403
