"""GET /auth/revocations: a server-sent-events feed of deleted sessions, for services that
verify tokens locally. Real `tessera serve` processes and a real Redis."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
import uvicorn
from fastapi import FastAPI

from tessera.api.revocations import RevocationHub, close_revocation_hub
from tessera.stores.sessions import REVOCATION_CHANNEL
from tests.conftest import (
    PASSWORD,
    SERVICE_KEY,
    assert_problem,
    bearer,
    client_for,
    login,
    register,
    running_app,
)
from tests.servers import (
    LOOPBACK,
    TesseraServer,
    free_port,
    session_server_env,
    tessera_server,
)

FEED = "/auth/revocations"
SERVICE = bearer(SERVICE_KEY)





class Feed:
    """One open event stream, read line by line."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def line(self, within: float = 5.0) -> str:
        return await asyncio.wait_for(anext(self._lines), within)

    async def event(self, within: float = 5.0) -> dict[str, Any]:
        """The next event's data, skipping comments and other fields."""
        deadline = time.monotonic() + within
        data: list[str] = []
        while True:
            line = await self.line(max(0.01, deadline - time.monotonic()))
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                return json.loads("\n".join(data))  # type: ignore[no-any-return]


@asynccontextmanager
async def open_feed(client: httpx.AsyncClient, url: str = FEED) -> AsyncIterator[Feed]:
    async with client.stream("GET", url, headers=SERVICE) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        feed = Feed(response)
        # The first chunk says the instance is subscribed: nothing is missed from here on.
        assert await feed.line() == "retry: 1000"
        assert await feed.line() == ": subscribed"
        assert await feed.line() == ""
        yield feed


async def new_session(client: httpx.AsyncClient, email: str) -> tuple[str, str, int]:
    body = (await login(client, email)).json()
    return body["access_token"], body["session_id"], body["expires_in"]


def claims_of(token: str) -> dict[str, Any]:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]


# --- access ---------------------------------------------------------------------------------


async def test_feed_requires_a_service_key_like_introspection(http: httpx.AsyncClient) -> None:
    user = await register(http)
    token, _, _ = await new_session(http, user["email"])
    for headers in ({}, bearer("wrong-" + SERVICE_KEY), bearer(token),
                    {"Authorization": f"Basic {SERVICE_KEY}"}):
        response = await http.get(FEED, headers=headers)
        assert_problem(response, 401, "invalid_client")
        assert response.headers["www-authenticate"].startswith("Bearer")
    schema = (await http.get("/openapi.json")).json()
    assert "text/event-stream" in schema["paths"][FEED]["get"]["responses"]["200"]["content"]


# --- events ---------------------------------------------------------------------------------


async def test_feed_streams_one_event_per_deleted_session(http: httpx.AsyncClient) -> None:
    user = await register(http)
    sessions = [await new_session(http, user["email"]) for _ in range(5)]
    (t1, s1, _), (t2, s2, _), (t3, s3, _), (t4, s4, _), (t5, s5, _) = sessions
    async with open_feed(http) as feed:
        headers = feed.response.headers
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["cache-control"] == "no-store"
        assert headers["x-accel-buffering"] == "no"

        assert (await http.post("/auth/logout", headers=bearer(t1))).status_code == 204
        assert await feed.event() == {"sid": s1, "sub": user["id"], "exp": claims_of(t1)["exp"]}

        assert (await http.delete(f"/auth/sessions/{s2}", headers=bearer(t3))).status_code == 204
        assert await feed.event() == {"sid": s2, "sub": user["id"], "exp": claims_of(t2)["exp"]}

        changed = await http.post("/me/password", headers=bearer(t3), json={
            "current_password": PASSWORD, "new_password": PASSWORD + "!"})
        assert changed.status_code == 204, changed.text
        got = {(await feed.event())["sid"], (await feed.event())["sid"]}
        assert got == {s4, s5}  # every other session; t3's own stays

        assert (await http.post("/auth/logout-all", headers=bearer(t3))).status_code == 204
        assert (await feed.event())["sid"] == s3


async def test_every_client_gets_every_event_over_one_subscription(
        http: httpx.AsyncClient, server: TesseraServer, redis_url: str) -> None:
    redis = sync_redis.Redis.from_url(redis_url)

    def subscribers() -> int:
        return int(dict(redis.pubsub_numsub(REVOCATION_CHANNEL))[REVOCATION_CHANNEL.encode()])

    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # an earlier test's stream may still be winding down
        if not subscribers():
            break
        await asyncio.sleep(0.05)
    before = subscribers()
    user = await register(http)
    token, sid, _ = await new_session(http, user["email"])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as other:
        async with open_feed(http) as first, open_feed(other) as second:
            assert subscribers() == before + 1  # one subscription per instance
            await http.post("/auth/logout", headers=bearer(token))
            assert (await first.event())["sid"] == sid
            assert (await second.event())["sid"] == sid
    deadline = time.monotonic() + 5
    while subscribers() != before:  # the last client left: the instance unsubscribes
        assert time.monotonic() < deadline, "the instance kept its subscription"
        await asyncio.sleep(0.05)
    redis.close()


async def test_events_only_for_sessions_deleted_while_connected(http: httpx.AsyncClient) -> None:
    user = await register(http)
    before, _, _ = await new_session(http, user["email"])
    await http.post("/auth/logout", headers=bearer(before))
    token, sid, _ = await new_session(http, user["email"])
    async with open_feed(http) as feed:
        await http.post("/auth/logout", headers=bearer(token))
        assert (await feed.event())["sid"] == sid


# --- in-process server: heartbeats, disconnects, shutdown -----------------------------------


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """Serve an app whose lifespan already runs on a real uvicorn in this event loop."""
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=free_port(), lifespan="off",
                                           log_config=None, access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://{LOOPBACK}:{server.config.port}"
    finally:
        await close_revocation_hub(app)  # what the lifespan does at shutdown
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_heartbeats_and_client_disconnect(base_settings: dict[str, Any]) -> None:
    async with running_app(**base_settings) as app:
        hub = RevocationHub(app.state.tessera.redis, heartbeat_seconds=0.2)
        app.state.revocation_hub = hub
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            async with open_feed(http) as feed:
                assert hub.client_count == 1 and hub.listening
                started = time.monotonic()
                assert await feed.line(within=4) == ": heartbeat"
                assert await feed.line() == ""
                assert await feed.line(within=4) == ": heartbeat"
                # 0.2 s apart; the bound only tells the hub's heartbeat from the default
                # (15 s), with room for a loaded machine (it failed once at 1.5 s)
                assert time.monotonic() - started < 5
            deadline = time.monotonic() + 5
            while hub.client_count or hub.listening:  # disconnect noticed, subscription ended
                assert time.monotonic() < deadline, "the stream outlived its client"
                await asyncio.sleep(0.05)


async def test_closing_the_hub_ends_every_stream(base_settings: dict[str, Any]) -> None:
    async with running_app(**base_settings) as app:
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            async with open_feed(http) as feed:
                await close_revocation_hub(app)
                with pytest.raises(StopAsyncIteration):
                    await feed.line()
            refused = await http.get(FEED, headers=SERVICE)
            assert_problem(refused, 503, "unavailable")


async def test_unavailable_without_redis(base_settings: dict[str, Any]) -> None:
    nowhere = f"redis://{LOOPBACK}:{free_port()}/0"
    async with running_app(**{**base_settings, "redis_url": nowhere}) as app:
        async with client_for(app) as client:
            response = await client.get(FEED, headers=SERVICE)
    assert_problem(response, 503, "unavailable")
    assert response.headers["retry-after"] == "1"


async def test_sigterm_ends_open_streams_and_the_server_stops_promptly(
        base_settings: dict[str, Any], tmp_path: Path) -> None:
    with tessera_server(session_server_env(base_settings, tmp_path), tmp_path / "logs") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            async with open_feed(http) as feed:
                started = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                with pytest.raises(StopAsyncIteration):
                    while True:
                        await feed.line(within=5)
                ended = time.monotonic() - started
        while server.proc.poll() is None:
            assert time.monotonic() - started < 10, "the server did not stop"
            await asyncio.sleep(0.05)
        stopped = time.monotonic() - started
    # Without ending the streams, uvicorn would wait its 20 s graceful-shutdown timeout.
    assert ended < 2 and stopped < 5, (ended, stopped)
    assert server.proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
