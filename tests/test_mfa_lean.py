"""The second login step's cost and its races (issue 14, speed): what one POST /auth/login/mfa
asks of Redis (seen with MONITOR on the real redis-server) and of the database (statements
seen by a SQLAlchemy event listener), and that folding the steps together kept the rules:
the mfa_token is single use, a TOTP code is accepted once whichever path checks it, and a
pending login does not outlive a change to the user (deactivation and reactivation, a
password change, a restriction, a factor replaced between the two steps)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import event, update

from tessera.stores.models import User
from tests.conftest import PASSWORD, assert_problem, bearer, client_for, registered_token
from tests.test_mfa import enrol_totp, mfa_token_for, totp_code


@contextlib.asynccontextmanager
async def redis_commands(redis_url: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Every command the Redis server runs meanwhile (MONITOR), until the block ends: a
    marker GET sent at the end, once seen, says the stream has caught up."""
    seen: list[dict[str, Any]] = []
    marker = "tessera:test-marker:" + secrets.token_hex(8)
    watcher = Redis.from_url(redis_url, decode_responses=True)
    ready, done = asyncio.Event(), asyncio.Event()

    async def watch() -> None:
        async with watcher.monitor() as monitor:
            ready.set()
            async for command in monitor.listen():
                if marker in command["command"]:
                    done.set()
                    return
                seen.append(command)

    task = asyncio.create_task(watch())
    await asyncio.wait_for(ready.wait(), 10)
    await asyncio.sleep(0.05)  # MONITOR is registered by the time its OK is read
    try:
        yield seen
    finally:
        other = Redis.from_url(redis_url, decode_responses=True)
        for _ in range(100):  # the first marker may race the MONITOR registration
            await other.get(marker)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done.wait()), 0.1)
            if done.is_set():
                break
        await other.aclose()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await watcher.aclose()


async def user_with_totp(client: httpx.AsyncClient) -> tuple[dict[str, Any], str, str,
                                                              list[str]]:
    user, token = await registered_token(client)
    secret, codes = await enrol_totp(client, token)
    return user, token, secret, codes


async def test_a_totp_second_step_is_one_redis_script(client: httpx.AsyncClient,
                                                     redis_url: str) -> None:
    """The token read, the attempt counted on the token and the account, the code's MAC
    compared, the time step taken, the token spent, the counter cleared and the session
    written: one script, one round trip (a durable Redis fsyncs once)."""
    warm, _, warm_secret, _ = await user_with_totp(client)  # scripts loaded (SCRIPT LOAD once)
    assert (await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, warm["email"]),
        "code": totp_code(warm_secret, 1)})).status_code == 200
    user, _, secret, _ = await user_with_totp(client)
    mfa_token = await mfa_token_for(client, user["email"])
    client.cookies.clear()  # as a browser logging in has no session yet (none to check)
    async with redis_commands(redis_url) as seen:
        done = await client.post("/auth/login/mfa", json={"mfa_token": mfa_token,
                                                          "code": totp_code(secret, 1)})
    assert done.status_code == 200, done.text
    # What this login sent (not what a script ran inside, not other tasks' work): commands
    # on the user's keys or on second-factor state.
    mine = [c for c in seen if c.get("client_type") != "lua"
            and (user["id"] in c["command"] or "mfa" in c["command"])]
    assert [c["command"].split()[0].upper() for c in mine] == ["EVALSHA"], [
        c["command"][:200] for c in mine]
    inside = [c["command"].split()[0].upper() for c in seen if c.get("client_type") == "lua"]
    # the count, the step taken, the session
    assert "HINCRBY" in inside and "HSET" in inside and "ZADD" in inside, inside


async def _step_watched(app: FastAPI, client: httpx.AsyncClient, mfa_token: str,
                        code: str) -> tuple[httpx.Response, list[str], list[int]]:
    """POST /auth/login/mfa, with the statements and commits it made (httpx's ASGI
    transport runs the app in the test's task)."""
    engine = app.state.tessera.engine.sync_engine
    here = asyncio.current_task()
    statements: list[str] = []
    commits: list[int] = []

    def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if asyncio.current_task() is here:
            statements.append(" ".join(statement.split()[:3]).upper())

    def on_commit(conn: Any) -> None:
        if asyncio.current_task() is here:
            commits.append(1)

    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "commit", on_commit)
    try:
        done = await client.post("/auth/login/mfa", json={"mfa_token": mfa_token,
                                                          "code": code})
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "commit", on_commit)
    return done, statements, commits


async def test_a_totp_second_step_does_no_database_work(app: FastAPI,
                                                       client: httpx.AsyncClient) -> None:
    """No statement and no commit: the replay guard is in Redis, the user's flags came with
    the mfa_token (valid while the profile generation holds), and the audit event is
    buffered off the request's path (stores/audit.py), yet written."""
    user, _, secret, _ = await user_with_totp(client)
    mfa_token = await mfa_token_for(client, user["email"])
    client.cookies.clear()
    done, statements, commits = await _step_watched(app, client, mfa_token,
                                                    totp_code(secret, 1))
    assert done.status_code == 200, done.text
    assert statements == [] and commits == [], statements
    await app.state.tessera.audit_trail.flush()  # the event is there once flushed
    async with app.state.tessera.db_factory() as db:
        from sqlmodel import select

        from tessera.stores.models import AuditEvent

        events = (await db.exec(select(AuditEvent).where(
            AuditEvent.user_id == user["id"], AuditEvent.event == "login_mfa"))).all()
    assert [e.outcome for e in events] == ["ok"]


async def test_one_mfa_token_sent_twice_at_once_gives_one_session(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """Two right answers (a TOTP code and a recovery code) on one mfa_token at once: the
    token is taken in the script that writes the session, so exactly one session."""
    user, token, secret, codes = await user_with_totp(client)
    before = len((await client.get("/auth/sessions", headers=bearer(token))).json())
    mfa_token = await mfa_token_for(client, user["email"])
    async with client_for(app) as other:
        answers = await asyncio.gather(
            client.post("/auth/login/mfa", json={"mfa_token": mfa_token,
                                                 "code": totp_code(secret, 1)}),
            other.post("/auth/login/mfa", json={"mfa_token": mfa_token, "code": codes[0]}))
    assert sorted(a.status_code for a in answers) == [200, 401], [a.text for a in answers]
    loser = next(a for a in answers if a.status_code == 401)
    assert loser.json()["code"] in ("invalid_token", "invalid_code")
    after = len((await client.get("/auth/sessions", headers=bearer(token))).json())
    assert after == before + 1


async def test_a_pending_login_does_not_survive_deactivation(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """Deactivated and reactivated between the password and the code: the mfa_token was
    earned before the change, so it opens no session (issue 12.1: no session from before a
    deactivation comes back with the account). The epoch read before the password was
    checked travels in the mfa_token and must still hold when the session is written."""
    user, token, secret, codes = await user_with_totp(client)
    admin_user, admin = await registered_token(client)
    async with app.state.tessera.db_factory() as db:
        await db.exec(update(User).where(User.id == admin_user["id"]).values(is_admin=True))
        await db.commit()
    mfa_token = await mfa_token_for(client, user["email"])
    deactivated = await client.post("/me/deactivate", headers=bearer(token))
    assert deactivated.status_code == 204, deactivated.text
    reactivated = await client.post(f"/admin/users/{user['id']}/reactivate",
                                    headers=bearer(admin))
    assert reactivated.status_code == 204, reactivated.text
    late = await client.post("/auth/login/mfa", json={"mfa_token": mfa_token,
                                                      "code": totp_code(secret, 1)})
    assert_problem(late, 401, "invalid_credentials")
    # A fresh login (the password again) works: the code above was spent, a recovery code.
    fresh = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": codes[0]})
    assert fresh.status_code == 200, fresh.text


@pytest.mark.parametrize("garbage", ["nope", "0" * 32 + ".x", "g" * 32 + ".abc", "." * 40])
async def test_malformed_mfa_tokens_are_invalid(client: httpx.AsyncClient,
                                                garbage: str) -> None:
    assert_problem(await client.post("/auth/login/mfa", json={"mfa_token": garbage,
                                                              "code": "123456"}),
                   401, "invalid_token")


async def test_a_token_past_its_limit_spends_nothing_of_the_account(
        client: httpx.AsyncClient) -> None:
    """Both limits are counted in one script; a token already past its 5 tries is refused
    without counting on the account's 10, as when the two limiters ran apart."""
    user, _, secret, _ = await user_with_totp(client)
    mfa_token = await mfa_token_for(client, user["email"])
    for _ in range(5):
        assert_problem(await client.post("/auth/login/mfa", json={
            "mfa_token": mfa_token, "code": "123456"}), 401, "invalid_code")
    for _ in range(6):
        assert_problem(await client.post("/auth/login/mfa", json={
            "mfa_token": mfa_token, "code": "123456"}), 429, "too_many_attempts")
    # 5 of the account's 10 spent: another token still gets its tries, and a right code in.
    other = await mfa_token_for(client, user["email"])
    for _ in range(4):
        assert_problem(await client.post("/auth/login/mfa", json={
            "mfa_token": other, "code": "123456"}), 401, "invalid_code")
    done = await client.post("/auth/login/mfa", json={"mfa_token": other,
                                                      "code": totp_code(secret, 1)})
    assert done.status_code == 200, done.text


async def test_a_factor_replaced_between_the_steps_is_not_the_one_checked(
        client: httpx.AsyncClient) -> None:
    """The mfa_token carries the factor sealed as the first step found it; the second step's
    one statement takes the time step only if that factor is still the user's. TOTP
    disabled and enrolled anew in between (another session, no change that ends sessions):
    the old authenticator's code opens nothing, the new one's does."""
    user, token, old_secret, _ = await user_with_totp(client)
    pending = await mfa_token_for(client, user["email"])
    disabled = await client.request("DELETE", "/me/mfa/totp", headers=bearer(token), json={
        "current_password": PASSWORD, "code": totp_code(old_secret, 1)})
    assert disabled.status_code == 204, disabled.text
    new_secret, _ = await enrol_totp(client, token)  # its last step: the current one
    # A later step than the new factor's last: only the factor check can refuse it.
    old_code = await client.post("/auth/login/mfa", json={
        "mfa_token": pending, "code": totp_code(old_secret, 1)})
    assert_problem(old_code, 401, "invalid_code")
    new_code = await client.post("/auth/login/mfa", json={
        "mfa_token": pending, "code": totp_code(new_secret, 1)})
    assert new_code.status_code == 200, new_code.text


async def test_a_restriction_made_between_the_steps_stops_tracking_the_login(
        app: FastAPI) -> None:
    """The user's flags come from the second step's own statement, not from the first
    step: restricted in between (from another session), the login is not tracked."""
    async with client_for(app) as client:
        user, token, secret, _ = await user_with_totp(client)
        pending = await mfa_token_for(client, user["email"])
        restricted = await client.put("/me/restrictions", headers=bearer(token), json={
            "restrict_processing": True, "object_to_processing": False})
        assert restricted.status_code in (200, 204), restricted.text
        client.cookies.clear()
        done = await client.post("/auth/login/mfa", json={"mfa_token": pending,
                                                          "code": totp_code(secret, 1)})
    assert done.status_code == 200, done.text
    assert done.headers["tk"] == "N"
    assert "visitor" not in done.headers.get("set-cookie", "")


async def test_a_restriction_made_before_the_first_step_travels_with_the_mfa_token(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """Restricted before the password step: the one-script second step takes the user's
    flags from the mfa_token (nothing changed since), so the login is not tracked; and the
    code it accepted is refused next time."""
    user, token, secret, _ = await user_with_totp(client)
    await client.put("/me/restrictions", headers=bearer(token), json={
        "restrict_processing": True, "object_to_processing": False})
    pending = await mfa_token_for(client, user["email"])
    client.cookies.clear()
    done, statements, _ = await _step_watched(app, client, pending, totp_code(secret, 1))
    assert done.status_code == 200, done.text
    assert statements == []  # the one-script path, not the full check
    assert done.headers["tk"] == "N"
    assert "visitor" not in done.headers.get("set-cookie", "")
    replay = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": totp_code(secret, 1)})
    assert_problem(replay, 401, "invalid_code")


_NOT_AN_OBJECT = "Input should be a valid dictionary or object to extract fields from"


@pytest.mark.parametrize(("request_kw", "status", "code", "errors"), [
    ({"content": b'{"mfa_token":"x","code":"1"}'}, 422, "validation_error",
     [{"loc": ["body"], "msg": _NOT_AN_OBJECT}]),  # no content type: not read as JSON
    ({"content": b'{"mfa_token":"x"}', "headers": {"content-type": "text/plain"}}, 422,
     "validation_error", [{"loc": ["body"], "msg": _NOT_AN_OBJECT}]),
    ({"data": {"mfa_token": "x", "code": "1"}}, 422, "validation_error",
     [{"loc": ["body"], "msg": _NOT_AN_OBJECT}]),
    ({"content": b'{"mfa_token":', "headers": {"content-type": "application/json"}}, 422,
     "validation_error", [{"loc": ["body", 13], "msg": "JSON decode error"}]),
    ({"json": [1, 2]}, 422, "validation_error", [{"loc": ["body"], "msg": _NOT_AN_OBJECT}]),
    ({"json": {"mfa_token": "x", "code": "1", "zzz": 1}}, 422, "validation_error",
     [{"loc": ["body", "zzz"], "msg": "Extra inputs are not permitted"}]),
    ({"json": {"mfa_token": "x" * 200}}, 422, "validation_error",
     [{"loc": ["body", "mfa_token"], "msg": "String should have at most 128 characters"}]),
    ({"json": {"mfa_token": "x", "code": 123456}}, 422, "validation_error",
     [{"loc": ["body", "code"], "msg": "Input should be a valid string"}]),
    ({"content": b"", "headers": {"content-type": "application/json"}}, 422,
     "validation_error", [{"loc": ["body"], "msg": "Field required"}]),
    ({"content": b'{"mfa_token":"\xff"}', "headers": {"content-type": "application/json"}},
     400, "malformed_body", None),
    ({"content": b'{"mfa_token":"x","code":"1"}',
      "headers": {"content-type": "application/vnd.api+json; charset=utf-8"}},
     401, "invalid_token", None),  # any +json type is JSON
    ({"content": b"[" * 20_000 + b"]" * 20_000,
      "headers": {"content-type": "application/json"}}, 400, "malformed_body", None),
])
async def test_the_lean_second_step_reads_its_body_as_every_route_does(
        client: httpx.AsyncClient, request_kw: dict[str, Any], status: int, code: str,
        errors: list[dict[str, Any]] | None) -> None:
    """POST /auth/login/mfa is a plain ASGI handler (api/lean.py); its body is read and
    validated as FastAPI reads a route's body model (api/schemas.py `read_json`): the same
    answer, status, code and errors, as before it was lean."""
    answer = await client.post("/auth/login/mfa", **request_kw)
    body = assert_problem(answer, status, code)
    if errors is not None:
        assert body["errors"] == errors


async def test_the_lean_second_step_is_in_the_schema_and_other_methods_are_405(
        client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/auth/login/mfa"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["mfa_token"] and body["additionalProperties"] is False
    assert {"200", "401", "422", "429"} <= set(operation["responses"])
    refused = await client.get("/auth/login/mfa")
    assert_problem(refused, 405, "method_not_allowed")
    assert refused.headers["allow"] == "POST"


async def _change_row(app: FastAPI, user_id: str, **values: Any) -> None:
    """A change committed to the user's row and nothing else yet: the moment between a
    password change's (or a deactivation's) COMMIT and what follows it (the profile
    generation moved, the sessions ended)."""
    async with app.state.tessera.db_factory() as db:
        await db.exec(update(User).where(User.id == user_id).values(**values))
        await db.commit()


async def test_a_password_change_ends_the_session_of_a_second_step_in_its_window(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """Between a password change's COMMIT and its revoke_all, a second step can still open
    a session (as a password login whose hash check spans the commit does); the revoke_all
    that follows ends it, and a pending token of before the change opens nothing after."""
    user, _, secret, codes = await user_with_totp(client)
    pending = await mfa_token_for(client, user["email"])
    later = await mfa_token_for(client, user["email"])
    await _change_row(app, user["id"], password_hash="$bcrypt-sha256$v=2,t=2b,r=4$x$y")
    in_window = await client.post("/auth/login/mfa", json={"mfa_token": pending,
                                                           "code": totp_code(secret, 1)})
    assert in_window.status_code == 200, in_window.text
    session_token = in_window.json()["access_token"]
    client.cookies.clear()
    assert (await client.get("/me", headers=bearer(session_token))).status_code == 200
    await app.state.tessera.logins.revoke_all(user["id"], "password_changed")
    assert_problem(await client.get("/me", headers=bearer(session_token)), 401,
                   "not_authenticated")
    # The epoch moved: the full check runs, and the token's password is not the row's.
    assert_problem(await client.post("/auth/login/mfa", json={"mfa_token": later,
                                                              "code": codes[0]}),
                   401, "invalid_token")


async def test_a_restricted_users_refused_second_step_is_not_tracked(
        app: FastAPI) -> None:
    """Deactivated (the row committed and the profile generation moved, as `deactivate`
    does before it ends the sessions): the full check runs, 403 account_inactive, and for a
    restricted user that answer says `Tk: N` and sets no visitor cookie too."""
    from tessera.domain import accounts

    async with client_for(app) as client:
        user, token, secret, _ = await user_with_totp(client)
        await client.put("/me/restrictions", headers=bearer(token), json={
            "restrict_processing": True, "object_to_processing": False})
        pending = await mfa_token_for(client, user["email"])
        await _change_row(app, user["id"], is_active=False)
        await accounts.user_changed(app.state.tessera.profiles, user["id"])
        client.cookies.clear()
        refused = await client.post("/auth/login/mfa", json={"mfa_token": pending,
                                                             "code": totp_code(secret, 1)})
    assert_problem(refused, 403, "account_inactive")
    assert refused.headers["tk"] == "N"
    assert "visitor" not in refused.headers.get("set-cookie", "")


async def test_a_code_is_accepted_once_whichever_path_checks_it(
        client: httpx.AsyncClient) -> None:
    """One replay guard for the one-script second step, the full check (sensitive changes)
    and the enrolment: a code spent by one is refused by the others."""
    user, token, secret, _ = await user_with_totp(client)
    # the enrolment's code (of the current step) is spent: the login refuses it
    assert_problem(await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": totp_code(secret)}),
        401, "invalid_code")
    # spent by the login's one script, refused by a sensitive change's full check
    done = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]),
        "code": totp_code(secret, 1)})
    assert done.status_code == 200, done.text
    change = {"current_password": PASSWORD, "code": totp_code(secret, 1)}
    assert_problem(await client.post("/me/mfa/recovery-codes", headers=bearer(token),
                                     json=change), 401, "invalid_code")


async def test_a_code_spent_by_a_sensitive_change_is_refused_at_login(
        client: httpx.AsyncClient) -> None:
    user, token, secret, _ = await user_with_totp(client)
    pending = await mfa_token_for(client, user["email"])
    change = await client.post("/me/mfa/recovery-codes", headers=bearer(token), json={
        "current_password": PASSWORD, "code": totp_code(secret, 1)})
    assert change.status_code == 200, change.text
    assert_problem(await client.post("/auth/login/mfa", json={
        "mfa_token": pending, "code": totp_code(secret, 1)}), 401, "invalid_code")


async def test_the_pending_login_keeps_no_totp_secret_in_redis(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """The token's hash holds MACs of the codes of the steps it can be used in, keyed by
    the service secret, not the TOTP secret (nor the code)."""
    from tessera.stores import mfa_login

    user, _, secret, _ = await user_with_totp(client)
    pending = await mfa_token_for(client, user["email"])
    redis = app.state.tessera.redis
    stored = await redis.hgetall(mfa_login.token_key(user["id"], pending))
    macs = {k: v for k, v in stored.items() if k.startswith("c")}
    assert 10 <= len(macs) <= 24, sorted(stored)  # 5 minutes of 30-s steps, and the drift
    values = " ".join(str(v) for v in stored.values())
    assert secret not in values and totp_code(secret) not in values
    assert all(len(v) == 32 for v in macs.values())
    assert "tf" not in stored["r"]


async def test_a_pending_login_without_code_macs_takes_the_full_check(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """A token whose record has only the record (written by a tessera before the one-script
    step, or by a passkey's first step): the full check opens the session."""
    from tessera.stores import mfa_login

    user, _, secret, _ = await user_with_totp(client)
    pending = await mfa_token_for(client, user["email"])
    redis = app.state.tessera.redis
    key = mfa_login.token_key(user["id"], pending)
    fields = [k for k in await redis.hkeys(key) if k not in ("r", "n")]
    await redis.hdel(key, *fields)
    done = await client.post("/auth/login/mfa", json={"mfa_token": pending,
                                                      "code": totp_code(secret, 1)})
    assert done.status_code == 200, done.text
    replay = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": totp_code(secret, 1)})
    assert_problem(replay, 401, "invalid_code")


async def test_a_client_that_leaves_mid_body_gets_400(app: FastAPI) -> None:
    """As FastAPI answers a body it could not read: 400 malformed_body, no 500."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/auth/login/mfa", "raw_path": b"",
             "root_path": "", "query_string": b"", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 5000),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", b"100")]}
    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert b'"malformed_body"' in b"".join(m.get("body", b"") for m in sent[1:])


async def test_a_pending_login_is_kept_only_while_the_epoch_holds(redis_url: str) -> None:
    """`put` writes an mfa_token only if nothing ended the user's sessions since the first
    factor was checked, and the user's list of pending tokens keeps only live ones."""
    from tessera.stores import mfa_login
    from tessera.stores.sessions import epoch_key

    redis = Redis.from_url(redis_url)
    user_id = secrets.token_hex(16)
    try:
        await redis.set(epoch_key(user_id), "5")
        assert await mfa_login.put(redis, user_id, f"{user_id}.old", {"uid": user_id}, 30,
                                   epoch="4") is False
        assert await redis.exists(mfa_login.token_key(user_id, f"{user_id}.old")) == 0
        assert await mfa_login.put(redis, user_id, f"{user_id}.a", {"uid": user_id}, 1,
                                   epoch="5") is True
        await asyncio.sleep(2.1)  # that one expired (and its entry is past its score)
        assert await mfa_login.put(redis, user_id, f"{user_id}.b", {"uid": user_id}, 30,
                                   epoch="5") is True
        assert await redis.zrange(mfa_login.pending_key(user_id), 0, -1) == [
            mfa_login.token_key(user_id, f"{user_id}.b").encode()]
        await mfa_login.forget(redis, user_id)
        assert await redis.exists(mfa_login.pending_key(user_id),
                                  mfa_login.token_key(user_id, f"{user_id}.b")) == 0
    finally:
        await redis.delete(epoch_key(user_id))
        await redis.aclose()


async def test_the_one_script_step_fails_closed_while_refused_deletions_wait(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """It trusts the epoch and generation kept in Redis, so while deletions Redis refused
    (a deactivation's epoch bump, say) are not done it answers 503, as token checks do;
    the token is left as it was."""
    user, _, secret, _ = await user_with_totp(client)
    pending = await mfa_token_for(client, user["email"])
    gate = app.state.tessera.sessions.writes
    gate._fail("test: refused deletions are not done yet")
    try:
        refused = await client.post("/auth/login/mfa", json={"mfa_token": pending,
                                                             "code": totp_code(secret, 1)})
    finally:
        gate.failing = False
    assert_problem(refused, 503, "unavailable")
    done = await client.post("/auth/login/mfa", json={"mfa_token": pending,
                                                      "code": totp_code(secret, 1)})
    assert done.status_code == 200, done.text


async def test_a_step_past_the_kept_macs_takes_the_full_check(
        base_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """An mfa_token that lives longer than the 24 steps whose MACs the first step keeps
    (TESSERA_MFA_TOKEN_TTL_SECONDS=900): a right code of a step without its MAC (or whose
    neighbours have none) is checked by the full check, not refused."""
    import types

    import pyotp

    from tessera.domain import mfa as dmfa
    from tests.conftest import running_app

    async with running_app(**{**base_settings, "mfa_token_ttl_seconds": 900}) as app:
        async with client_for(app) as client:
            user, _, secret, _ = await user_with_totp(client)
            start = time.time()
            pending = await mfa_token_for(client, user["email"])
            step = int(start // 30) - 1 + 24  # the first step kept MACs up to step - 1
            offset = step * 30 + 1 - time.time()
            monkeypatch.setattr(dmfa, "time", types.SimpleNamespace(
                time=lambda: time.time() + offset))
            done = await client.post("/auth/login/mfa", json={
                "mfa_token": pending, "code": pyotp.TOTP(secret).at(step * 30)})
    assert done.status_code == 200, done.text


@pytest.mark.parametrize("change", ["deactivate", "password"])
async def test_a_change_cut_short_after_its_commit_still_stops_a_pending_second_step(
        app: FastAPI, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """The process ends (here: what follows the COMMIT fails) after a deactivation's or a
    password change's commit, before the profile generation moves after it and before the
    sessions end: the generation moved before the commit too, so a second step begun
    before the change takes the full check, which reads the row and refuses."""
    from tessera.domain import accounts

    async def cut_short(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the process ended here")

    async with client_for(app) as client:
        user, token, secret, codes = await user_with_totp(client)
        pending = await mfa_token_for(client, user["email"])
        monkeypatch.setattr(accounts, "user_changed", cut_short)
        if change == "deactivate":
            cut = await client.post("/me/deactivate", headers=bearer(token))
        else:
            cut = await client.post("/me/password", headers=bearer(token), json={
                "current_password": PASSWORD, "new_password": "another-long-password-9",
                "code": codes[0]})
        monkeypatch.undo()
        assert cut.status_code == 500  # what the test made of the rest of the change
        client.cookies.clear()
        late = await client.post("/auth/login/mfa", json={"mfa_token": pending,
                                                          "code": totp_code(secret, 1)})
    if change == "deactivate":
        assert_problem(late, 403, "account_inactive")
    else:
        assert_problem(late, 401, "invalid_token")  # the token's password is not the row's


async def test_a_new_enrolment_never_replaces_a_confirmed_factor(
        app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """An enrolment that started while the previous one was being confirmed (its check saw
    no confirmed factor) must not delete the confirmed factor: 409, the factor stays."""
    from tessera.domain import mfa as dmfa
    from tessera.errors import Problem
    from tessera.stores.models import User as UserRow

    user, token, secret, _ = await user_with_totp(client)
    t = app.state.tessera

    async def not_yet_confirmed(db: Any, user_id: str) -> None:
        return None  # what the racing request read, before the confirmation committed

    async with t.db_factory() as db:
        row = await db.get(UserRow, user["id"])
        assert row is not None
        monkeypatch.setattr(dmfa.store, "get_totp", not_yet_confirmed)
        with pytest.raises(Problem) as refused:
            await dmfa.start_totp(db, t.factors, row)
        monkeypatch.undo()
    assert refused.value.code == "totp_already_enabled"
    done = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": totp_code(secret, 1)})
    assert done.status_code == 200, done.text
