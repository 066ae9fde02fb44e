"""Bad and hostile inputs get a 4xx problem+json with a `code`, never a 500."""

from __future__ import annotations

import pytest

from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    login,
    new_email,
    register,
    registered_token,
)


@pytest.mark.parametrize("is_adult", [False, "true", 1, None, "yes", [True]])
async def test_register_requires_is_adult_true(client, is_adult) -> None:
    body = {"email": new_email(), "password": PASSWORD, "is_adult": is_adult}
    assert_problem(await client.post("/auth/register", json=body), 422, "underage")


async def test_register_without_is_adult_is_underage(client) -> None:
    body = {"email": new_email(), "password": PASSWORD}
    assert_problem(await client.post("/auth/register", json=body), 422, "underage")


async def test_duplicate_email_differing_in_case_is_taken(client) -> None:
    user = await register(client)
    again = {"email": user["email"].upper(), "password": PASSWORD, "is_adult": True}
    assert_problem(await client.post("/auth/register", json=again), 409, "email_taken")


async def test_outdated_policy_version_is_refused(client) -> None:
    body = {"email": new_email(), "password": PASSWORD, "is_adult": True,
            "policy_version": "1999-01-01"}
    assert_problem(await client.post("/auth/register", json=body), 409, "policy_outdated")
    current = (await client.get("/policy")).json()["version"]
    ok = await client.post("/auth/register", json={**body, "policy_version": current})
    assert ok.status_code == 201


@pytest.mark.parametrize("body, field", [
    ({"password": PASSWORD, "is_adult": True}, "email"),
    ({"email": "not-an-email", "password": PASSWORD, "is_adult": True}, "email"),
    ({"email": "a@b.example", "is_adult": True}, "password"),
    ({"email": "a@b.example", "password": "short", "is_adult": True}, "password"),
    ({"email": "a@b.example", "password": "x" * 257, "is_adult": True}, "password"),
    ({"email": "a@b.example", "password": "nul\x00inside-password", "is_adult": True}, "password"),
    ({"email": "a@b.example", "password": "bell\x07inside-password", "is_adult": True}, "password"),
    ({"email": "a@b.example", "password": 12345678, "is_adult": True}, "password"),
    # Issue 12.7: counted before NFKC too: one code point that expands to 18 characters,
    # four ligatures that expand to eight.
    ({"email": "a@b.example", "password": "\ufdfa", "is_adult": True}, "password"),
    ({"email": "a@b.example", "password": "\ufb00\ufb00\ufb00\ufb00", "is_adult": True},
     "password"),
    ({"email": ("x" * 300) + "@example.com", "password": PASSWORD, "is_adult": True}, "email"),
])
async def test_register_validation_errors(client, body, field) -> None:
    problem = assert_problem(await client.post("/auth/register", json=body), 422,
                             "validation_error")
    assert any(field in map(str, e["loc"]) for e in problem["errors"]), problem
    assert all(set(e) >= {"loc", "msg"} for e in problem["errors"])
    # The offending value (maybe a password) is never echoed back.
    if isinstance(body.get("password"), str):
        assert body["password"] not in str(problem)


async def test_password_is_nfkc_normalised(client) -> None:
    # U+FB01 (the "fi" ligature) normalises to "fi" under NFKC.
    user = await register(client, password="\ufb01ne password here")
    assert (await login(client, user["email"], "fine password here")).status_code == 200


async def test_a_new_password_counts_code_points_before_and_after_nfkc(client) -> None:
    user, token = await registered_token(client)
    short = await client.post("/me/password", headers=bearer(token), json={
        "current_password": PASSWORD, "new_password": "\ufdfa"})
    assert_problem(short, 422, "validation_error")
    # eight code points that expand under NFKC pass (and log in by their expanded form)
    changed = await client.post("/me/password", headers=bearer(token), json={
        "current_password": PASSWORD, "new_password": "\ufb01" * 8})
    assert changed.status_code == 204
    assert (await login(client, user["email"], "fi" * 8)).status_code == 200


async def test_a_password_set_before_the_code_point_rule_still_logs_in(app, client) -> None:
    import unicodedata

    from sqlmodel import update

    from tessera.stores.models import User

    user = await register(client)
    t = app.state.tessera
    legacy = await t.hasher.hash(unicodedata.normalize("NFKC", "\ufdfa"))
    async with t.db_factory() as db:
        await db.exec(update(User).where(User.id == user["id"]).values(password_hash=legacy))
        await db.commit()
    assert (await login(client, user["email"], "\ufdfa")).status_code == 200


async def test_passwords_sharing_72_bytes_are_different(client) -> None:
    prefix = "p" * 72
    user = await register(client, password=prefix + "-one")
    assert (await login(client, user["email"], prefix + "-one")).status_code == 200
    assert_problem(await login(client, user["email"], prefix + "-two"), 401,
                   "invalid_credentials")


@pytest.mark.parametrize("content, ctype, status, code", [
    (b"{not json", "application/json", 400, "malformed_body"),
    (b"[1, 2]", "application/json", 422, "validation_error"),
    (b'"string"', "application/json", 422, "validation_error"),
    (b"\xff\xfe\x00", "application/json", 400, "malformed_body"),
    (b"email=a", "text/plain", 415, "unsupported_media_type"),
    (b"", "application/x-www-form-urlencoded", 422, "validation_error"),
])
async def test_login_rejects_malformed_bodies(client, content, ctype, status, code) -> None:
    response = await client.post("/auth/login", content=content,
                                 headers={"Content-Type": ctype})
    assert_problem(response, status, code)


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login"])
async def test_deeply_nested_and_wrong_typed_json(client, path) -> None:
    deep = "[" * 5000 + "]" * 5000
    response = await client.post(path, content=deep, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith("application/problem+json")
    wrong = await client.post(path, json={"email": {"$ne": None}, "password": ["x"]})
    assert 400 <= wrong.status_code < 500 and "code" in wrong.json()


async def test_body_over_the_limit_is_413(client) -> None:
    big = {"email": new_email(), "password": "x" * 70_000, "is_adult": True}
    assert_problem(await client.post("/auth/register", json=big), 413, "payload_too_large")


async def test_chunked_body_over_the_limit_is_413(client) -> None:
    async def chunks():
        for _ in range(20):
            yield b"x" * 8192

    response = await client.post("/auth/login", content=chunks(),
                                 headers={"Content-Type": "application/json"})
    assert_problem(response, 413, "payload_too_large")


async def test_unknown_route_and_method_are_problems(client) -> None:
    assert_problem(await client.get("/nope"), 404, "not_found")
    assert_problem(await client.delete("/healthz"), 405, "method_not_allowed")


async def test_hostile_path_and_header_values(client) -> None:
    user = await register(client)
    token = (await login(client, user["email"])).json()["access_token"]
    for sid in ("../../etc/passwd", "x" * 500, "%00", "{user}:s:*"):
        response = await client.delete(f"/auth/sessions/{sid}", headers=bearer(token))
        assert response.status_code in (404, 422), response.text
        assert "code" in response.json()
    weird = await client.get("/me", headers={"Authorization": "Basic Zm9vOmJhcg=="})
    assert_problem(weird, 401, "not_authenticated")
    assert (await client.get("/me", headers={**bearer(token), "X-Request-ID": "a" * 500})
            ).status_code == 200


async def test_nul_bytes_in_stored_text_are_refused_or_cleaned(app, client) -> None:
    user = await register(client)
    token = (await login(client, user["email"])).json()["access_token"]
    refused = await client.post("/me/privacy-requests", headers=bearer(token),
                                json={"kind": "access", "region": "DE", "message": "a\x00b"})
    assert_problem(refused, 422, "validation_error")
    assert_problem(await client.post("/auth/login", json={"email": "a\x00@b.c",
                                                          "password": PASSWORD}),
                   422, "validation_error")
    # A NUL in a path reaches the usage log cleaned, and the log keeps working.
    await client.delete("/auth/sessions/%00", headers=bearer(token))
    await client.get("/me", headers=bearer(token))
    await app.state.tessera.usage.flush()
    usage = (await client.get("/me/export", headers=bearer(token))).json()["usage_log"]
    paths = [e["path"] for e in usage]
    assert "/me" in paths and "/auth/sessions/\ufffd" in paths


def test_every_error_kind_raised_is_in_the_one_table() -> None:
    """Domain errors carry a kind; errors.ERRORS alone maps it to status and code. A kind
    missing there would be a 500 at run time."""
    import re
    from pathlib import Path

    from tessera.errors import ERRORS

    source = Path(__file__).resolve().parent.parent / "src" / "tessera"
    raised = {kind for path in source.rglob("*.py")
              for kind in re.findall(r'Problem\(\s*"([a-z_]+)"', path.read_text())}
    assert raised and raised <= set(ERRORS), sorted(raised - set(ERRORS))
    assert not re.search(r"Problem\(\s*\d{3}", "".join(
        p.read_text() for p in source.rglob("*.py"))), "a status outside the table"
