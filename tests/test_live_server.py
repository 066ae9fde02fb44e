"""A real `tessera serve`: SIGTERM drains in-flight requests and flushes buffered usage
events; logs are JSON with a request id and never hold secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import threading
from typing import Any

import httpx
from sqlalchemy import func
from sqlmodel import select

from tessera.stores.db import create_engine, session_factory
from tessera.stores.models import UsageSegment
from tests.conftest import PASSWORD, SERVICE_KEY, new_email
from tests.servers import session_server_env, shared_secret, tessera_server


def count_usage(database_url: str, user_id: str) -> int:
    async def run() -> int:
        engine = create_engine(database_url)
        async with session_factory(engine)() as db:
            n = (await db.exec(select(func.coalesce(func.sum(UsageSegment.count), 0))
                               .where(UsageSegment.user_id == user_id))).one()
        await engine.dispose()
        return int(n)

    return asyncio.run(run())


def test_sigterm_drains_in_flight_requests_and_flushes_usage(base_settings, tmp_path) -> None:
    # Usage events would wait 60 s for the flusher: only the shutdown flush can write them.
    # bcrypt cost 13 makes a login slow enough to be in flight when SIGTERM arrives.
    env = session_server_env(base_settings, tmp_path, TESSERA_USAGE_FLUSH_SECONDS="60",
                     TESSERA_BCRYPT_ROUNDS="13")
    with tessera_server(env, tmp_path / "logs") as server:
        email = new_email()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            user = http.post("/auth/register", json={"email": email, "password": PASSWORD,
                                                      "is_adult": True}).json()
            token = http.post("/auth/login", json={"email": email, "password": PASSWORD}
                              ).json()["access_token"]
            for _ in range(5):
                assert http.get("/me", headers={"Authorization": f"Bearer {token}"}
                                ).status_code == 200
        in_flight: dict[str, Any] = {}

        def slow_login() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                in_flight["response"] = http.post("/auth/login",
                                                  json={"email": email, "password": PASSWORD})

        thread = threading.Thread(target=slow_login)
        thread.start()
        import time

        time.sleep(0.15)  # the login is hashing now
        server.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=30)
        # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit says why.
        assert server.proc.wait(timeout=30) in (0, 143, -signal.SIGTERM)
        assert in_flight["response"].status_code == 200
    assert count_usage(str(base_settings["database_url"]), user["id"]) == 5


def test_logs_are_json_with_request_ids_and_hold_no_secrets(base_settings, tmp_path) -> None:
    env = session_server_env(base_settings, tmp_path, TESSERA_LOG_LEVEL="info")
    with tessera_server(env, tmp_path / "logs") as server:
        email = new_email()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            http.post("/auth/register", json={"email": email, "password": PASSWORD,
                                              "is_adult": True})
            token = http.post("/auth/login", json={"email": email, "password": PASSWORD}
                              ).json()["access_token"]
            http.post("/auth/login", json={"email": email, "password": "wrong " + PASSWORD},
                      headers={"X-Request-ID": "req-41"})
            http.post("/auth/introspect", data={"token": token},
                      headers={"Authorization": f"Bearer {SERVICE_KEY}"})
            http.post("/auth/introspect", data={"token": token},
                      headers={"Authorization": "Bearer wrong-" + SERVICE_KEY})
            http.get("/me", headers={"Authorization": f"Bearer {token}x", "DNT": "1"})
            http.post("/auth/register", content=b"{broken", headers={
                "Content-Type": "application/json", "X-Request-ID": "req-42"})
        server.stop()
        log = server.log()
    assert log.strip(), "the server wrote no log at all"
    for line in log.strip().splitlines():
        entry = json.loads(line)  # every line is JSON
        assert {"ts", "level", "logger", "msg"} <= set(entry)
    failed = [json.loads(line) for line in log.splitlines() if "req-41" in line]
    assert failed and failed[0]["audit"]["event"] == "login"
    assert failed[0]["audit"]["outcome"] == "failed" and "user_id" in failed[0]["audit"]
    for secret in (email, PASSWORD, token, SERVICE_KEY, shared_secret(base_settings["data_dir"])):
        assert secret not in log
    # No client IP in what requests log (the only address is uvicorn's own banner).
    assert all("127.0.0.1" not in line for line in log.splitlines() if "request_id" in line)


VERIFY_SCRIPT = """
import sys, jwt
jwks = jwt.PyJWKClient(sys.argv[1] + "/.well-known/jwks.json")
token = sys.stdin.read().strip()
key = jwks.get_signing_key_from_jwt(token)
claims = jwt.decode(token, key, algorithms=["EdDSA"], audience="tessera", issuer="tessera")
print(claims["sub"], claims["sid"])
"""


def test_another_process_verifies_tokens_with_pyjwkclient(base_settings, tmp_path) -> None:
    import subprocess
    import sys

    with tessera_server(session_server_env(base_settings, tmp_path), tmp_path / "logs") as server:
        email = new_email()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            user = http.post("/auth/register", json={"email": email, "password": PASSWORD,
                                                      "is_adult": True}).json()
            login = http.post("/auth/login", json={"email": email, "password": PASSWORD}).json()
            token = login["access_token"]
            verified = subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, server.url],
                                      input=token, capture_output=True, text=True, timeout=60)
            assert verified.returncode == 0, verified.stderr
            assert verified.stdout.split() == [user["id"], login["session_id"]]
            # Someone else's id in the payload, the signature left as it was.
            head, payload, signature = token.split(".")
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            forged = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "someone-else"})
                                              .encode()).rstrip(b"=").decode()
            tampered = f"{head}.{forged}.{signature}"
            refused = subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, server.url],
                                     input=tampered, capture_output=True, text=True, timeout=60)
            assert refused.returncode != 0 and "InvalidSignatureError" in refused.stderr
            # The signature outlives a logout; introspection does not.
            auth = {"Authorization": f"Bearer {SERVICE_KEY}"}
            assert http.post("/auth/introspect", data={"token": token}, headers=auth
                             ).json()["active"] is True
            assert http.post("/auth/logout", headers={"Authorization": f"Bearer {token}"}
                             ).status_code == 204
            assert http.post("/auth/introspect", data={"token": token}, headers=auth
                             ).json() == {"active": False}
            assert http.get("/me", headers={"Authorization": f"Bearer {token}"}
                            ).status_code == 401
