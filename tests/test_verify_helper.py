"""tessera_verify: other services verify tokens locally against the JWKS, may confirm by
introspection, and follow the revocation feed. Against a real `tessera serve`."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, FastAPI

from tessera_verify import Claims, TesseraVerifier, TokenRejected, VerifierUnavailable
from tests.conftest import SERVICE_KEY, bearer, login, register
from tests.servers import (
    LOOPBACK,
    ROOT,
    TesseraServer,
    downstream_example,
    free_port,
    session_server_env,
    tessera_server,
)


async def session_token(http: httpx.AsyncClient, email: str | None = None,
                        ) -> tuple[str, dict[str, Any]]:
    if email is None:
        email = (await register(http))["email"]
    body = (await login(http, email)).json()
    return body["access_token"], body


async def wait_until(predicate: Any, within: float, what: str) -> float:
    """Seconds until predicate() held; fails after `within` seconds."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < within, f"timed out: {what}"
        await asyncio.sleep(0.002)
    return time.monotonic() - started


def counting_client() -> tuple[httpx.AsyncClient, list[str]]:
    """A real HTTP client that notes the path of every request it sends."""
    paths: list[str] = []

    async def note(request: httpx.Request) -> None:
        paths.append(request.url.path)

    return httpx.AsyncClient(timeout=10, event_hooks={"request": [note]}), paths


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- local verification ---------------------------------------------------------------------


async def test_verifies_a_token_locally_against_the_jwks(http: httpx.AsyncClient,
                                                          server: TesseraServer) -> None:
    token, body = await session_token(http)
    async with TesseraVerifier(server.url) as verifier:
        claims = await verifier.verify(token)
    raw = jwt.decode(token, options={"verify_signature": False})
    assert claims.sid == body["session_id"] and claims.sub == raw["sub"]
    assert (claims.iss, claims.aud, claims.exp, claims.jti) == \
        ("tessera", "tessera", raw["exp"], raw["jti"])
    assert claims.kid == jwt.get_unverified_header(token)["kid"]
    assert claims.policy_accepted is None  # known only by introspection


async def test_rejects_forged_foreign_and_malformed_tokens(http: httpx.AsyncClient,
                                                           server: TesseraServer) -> None:
    token, _ = await session_token(http)
    header, payload, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    kid = jwt.get_unverified_header(token)["kid"]
    stranger = Ed25519PrivateKey.generate()
    tampered = ".".join([header, _b64(json.dumps({**claims, "sub": "someone-else"}).encode()),
                         signature])
    forged = [
        tampered,
        jwt.encode(claims, stranger, algorithm="EdDSA", headers={"kid": kid, "typ": "at+jwt"}),
        jwt.encode(claims, "s" * 32, algorithm="HS256", headers={"kid": kid, "typ": "at+jwt"}),
        ".".join([_b64(b'{"alg":"none","typ":"at+jwt","kid":"' + kid.encode() + b'"}'),
                  payload, ""]),
        "not a token", "", "a.b.c", token + "x", "x" * 5000,
    ]
    client, paths = counting_client()
    async with client, TesseraVerifier(server.url, http_client=client,
                                       jwks_min_refresh_seconds=0.5) as verifier:
        for bad in forged:
            with pytest.raises(TokenRejected):
                await verifier.verify(bad)
        assert (await verifier.verify(token)).sid == claims["sid"]  # the real one still passes
        # A key nobody published: one more fetch of the JWKS (not sooner than
        # jwks_min_refresh_seconds after the last), then none until that time has passed.
        await asyncio.sleep(0.6)
        fetches = len(paths)
        for attempt in range(5):
            stray = jwt.encode(claims, stranger, algorithm="EdDSA",
                               headers={"kid": f"unknown-{attempt}", "typ": "at+jwt"})
            with pytest.raises(TokenRejected):
                await verifier.verify(stray)
        assert len(paths) - fetches == 1 and paths[-1] == "/.well-known/jwks.json"


async def test_rejects_expired_wrong_audience_and_untyped_tokens(
        http: httpx.AsyncClient, server: TesseraServer, app: FastAPI) -> None:
    keys = app.state.tessera.keys  # the in-process app shares the database and the keys
    await keys.refresh()
    assert keys.current is not None and keys.current.private is not None
    now = int(time.time())
    good = {"iss": "tessera", "aud": "tessera", "sub": "u1", "sid": "s1", "iat": now,
            "exp": now + 60, "jti": "j1"}

    def sign(claims: dict[str, Any], typ: str = "at+jwt") -> str:
        return jwt.encode(claims, keys.current.private, algorithm="EdDSA",
                          headers={"kid": keys.current.kid, "typ": typ})

    async with TesseraVerifier(server.url) as verifier:
        assert (await verifier.verify(sign(good))).sub == "u1"  # the key is the served one
        for bad in (sign({**good, "iat": now - 120, "exp": now - 60}),
                    sign({**good, "aud": "another-service"}),
                    sign({**good, "iss": "someone-else"}),
                    sign({k: v for k, v in good.items() if k != "sid"}),
                    sign({**good, "sid": 42}),
                    sign(good, typ="JWT")):
            with pytest.raises(TokenRejected):
                await verifier.verify(bad)
    async with TesseraVerifier(server.url, audience="another-service") as other:
        with pytest.raises(TokenRejected):
            await other.verify(sign(good))


async def test_unreachable_jwks_is_unavailable_not_rejected() -> None:
    async with TesseraVerifier(f"http://{LOOPBACK}:{free_port()}", timeout_seconds=1) as verifier:
        token = jwt.encode({"sub": "u"}, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                           headers={"kid": "k", "typ": "at+jwt"})
        with pytest.raises(VerifierUnavailable):
            await verifier.verify(token)


# --- the FastAPI dependency -----------------------------------------------------------------


async def test_dependency_answers_401_with_www_authenticate(http: httpx.AsyncClient,
                                                            server: TesseraServer) -> None:
    verifier = TesseraVerifier(server.url)
    downstream = FastAPI()

    # (A default, not Annotated[...]: with postponed annotations FastAPI cannot see a local
    # name; at module level, as in the README, `Annotated[Claims, Depends(verifier)]` works.)
    @downstream.get("/whoami")
    async def whoami(user: Claims = Depends(verifier)) -> dict[str, str]:  # noqa: B008
        return {"sub": user.sub}

    token, _ = await session_token(http)
    transport = httpx.ASGITransport(app=downstream)
    async with verifier, httpx.AsyncClient(transport=transport, base_url="http://d") as client:
        ok = await client.get("/whoami", headers=bearer(token))
        assert ok.status_code == 200
        assert ok.json()["sub"] == jwt.decode(token, options={"verify_signature": False})["sub"]
        missing = await client.get("/whoami")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        for headers in (bearer(token + "x"), bearer("garbage"), {"Authorization": token}):
            refused = await client.get("/whoami", headers=headers)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Bearer")
        schemes = (await client.get("/openapi.json")).json()["components"]["securitySchemes"]
        assert any(s.get("scheme") == "bearer" for s in schemes.values())


# --- introspection --------------------------------------------------------------------------


async def test_introspection_confirms_the_session(http: httpx.AsyncClient,
                                                  server: TesseraServer) -> None:
    token, body = await session_token(http)
    async with TesseraVerifier(server.url, service_key=SERVICE_KEY, introspect=True) as verifier:
        claims = await verifier.verify(token)
        assert claims.sid == body["session_id"] and claims.policy_accepted is True
        await http.post("/auth/logout", headers=bearer(token))
        with pytest.raises(TokenRejected):  # no feed followed: introspection alone says so
            await verifier.verify(token)
        assert verifier.is_revoked(body["session_id"])  # and it is remembered
    token, _ = await session_token(http)
    async with TesseraVerifier(server.url, service_key="wrong-" + SERVICE_KEY,
                               introspect=True) as misconfigured:
        with pytest.raises(VerifierUnavailable):
            await misconfigured.verify(token)
    with pytest.raises(ValueError):
        TesseraVerifier(server.url, introspect=True)  # introspection needs a service key


async def test_introspects_only_while_the_feed_is_down(http: httpx.AsyncClient,
                                                       server: TesseraServer) -> None:
    token, _ = await session_token(http)
    client, paths = counting_client()
    async with client, TesseraVerifier(server.url, service_key=SERVICE_KEY, http_client=client,
                                       introspect="fallback") as verifier:
        await verifier.verify(token)
        assert paths.count("/auth/introspect") == 1  # not following the feed: ask tessera
        await verifier.follow_revocations()
        assert verifier.feed_live
        for _ in range(3):
            await verifier.verify(token)
        assert paths.count("/auth/introspect") == 1  # following it: local checks only


# --- the revocation feed --------------------------------------------------------------------


async def test_follows_revocations_and_rejects_logged_out_tokens_locally(
        http: httpx.AsyncClient, server: TesseraServer) -> None:
    user = await register(http)
    tokens = [(await session_token(http, user["email"]))[0] for _ in range(3)]
    sids = [jwt.decode(t, options={"verify_signature": False})["sid"] for t in tokens]
    async with TesseraVerifier(server.url, service_key=SERVICE_KEY) as verifier:
        task = await verifier.follow_revocations()
        assert verifier.feed_live and not task.done()
        for t in tokens:
            await verifier.verify(t)
        started = time.monotonic()
        await http.post("/auth/logout", headers=bearer(tokens[0]))
        await wait_until(lambda: verifier.is_revoked(sids[0]), 1.0, "logout seen")
        delay = time.monotonic() - started
        with pytest.raises(TokenRejected):
            await verifier.verify(tokens[0])
        await verifier.verify(tokens[1])  # the user's other sessions are untouched
        await http.post("/auth/logout-all", headers=bearer(tokens[1]))
        await wait_until(lambda: all(map(verifier.is_revoked, sids)), 1.0, "logout-all seen")
        for t in tokens[1:]:
            with pytest.raises(TokenRejected):
                await verifier.verify(t)
    assert task.done()  # aclose() stopped the follower
    print(f"\nlogout -> rejected locally after {delay * 1000:.1f} ms")


async def test_feed_reconnects_by_itself_after_a_drop(base_settings: dict[str, Any],
                                                      tmp_path: Path) -> None:
    env = session_server_env(base_settings, tmp_path)
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    client, paths = counting_client()
    async with client, TesseraVerifier(url, service_key=SERVICE_KEY, http_client=client,
                                       jwks_cache_seconds=0.1,
                                       jwks_min_refresh_seconds=1) as verifier:
        with tessera_server(env, tmp_path / "logs", port=port):
            await verifier.follow_revocations()
            assert verifier.feed_live and verifier.feed_connections == 1
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                token, _ = await session_token(http)
            await verifier.verify(token)
        await wait_until(lambda: not verifier.feed_live, 5, "the drop noticed")
        # tessera is down: the keys fetched before keep serving, fetched again at most
        # once per jwks_min_refresh_seconds (not once per request).
        await asyncio.sleep(0.2)
        fetches = paths.count("/.well-known/jwks.json")
        for _ in range(5):
            await verifier.verify(token)
        assert paths.count("/.well-known/jwks.json") - fetches == 1
        with tessera_server(env, tmp_path / "logs", name="restarted", port=port):
            await wait_until(lambda: verifier.feed_live, 15, "reconnected")
            assert verifier.feed_connections == 2
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                await http.post("/auth/logout", headers=bearer(token))
            sid = jwt.decode(token, options={"verify_signature": False})["sid"]
            await wait_until(lambda: verifier.is_revoked(sid), 1.0,
                             "logout seen after reconnecting")


def test_revoked_sessions_are_kept_until_their_tokens_expire() -> None:
    verifier = TesseraVerifier(jwks_url=f"http://{LOOPBACK}:1/jwks.json")
    now = int(time.time())
    verifier.revoke("long-gone", now - 5)  # its token expired already: nothing to keep
    verifier.revoke("soon", now + 1)
    verifier.revoke("later", now + 3600)
    assert not verifier.is_revoked("long-gone") and verifier.is_revoked("soon")
    time.sleep(2.1)
    verifier.revoke("another", now + 3600)  # each new revocation prunes the expired ones
    assert not verifier.is_revoked("soon") and verifier.is_revoked("later")
    assert verifier.revoked_count == 2
    with pytest.raises(ValueError):
        asyncio.run(verifier.follow_revocations())  # needs base_url and a service key


# --- packaging and the example --------------------------------------------------------------


def test_helper_imports_no_tessera_server_code() -> None:
    check = ("import sys, tessera_verify; "
             "leaked = [m for m in sys.modules if m == 'app' or m.startswith('app.')]; "
             "assert not leaked, leaked")
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True, timeout=60)


async def test_downstream_example_accepts_tokens_and_follows_logouts(
        http: httpx.AsyncClient, server: TesseraServer, tmp_path: Path) -> None:
    with downstream_example(server.url, SERVICE_KEY, tmp_path) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as ds:
            deadline = time.monotonic() + 10
            while not (await ds.get("/healthz")).json()["revocation_feed"]:
                assert time.monotonic() < deadline, "the example never followed the feed"
                await asyncio.sleep(0.05)
            token, body = await session_token(http)
            hello = await ds.get("/hello", headers=bearer(token))
            assert hello.status_code == 200
            assert hello.json()["session"] == body["session_id"]
            assert (await ds.get("/hello")).headers["www-authenticate"] == "Bearer"
            await http.post("/auth/logout", headers=bearer(token))
            deadline = time.monotonic() + 1
            while (await ds.get("/hello", headers=bearer(token))).status_code == 200:
                assert time.monotonic() < deadline, "the example still accepts a logged-out token"
                await asyncio.sleep(0.02)
