"""PostgreSQL faults through a TCP proxy of the test's own: a restart (every connection
dropped) under load answers 200 or 503, never 500, and loses no usage event; a partition
(the proxy stops forwarding) answers 503 within the configured timeouts, not its length."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import assert_problem, bearer, client_for, login, registered_token, running_app
from tests.servers import free_port
from tests.test_live_server import count_usage


class FaultyProxy:
    """A loopback TCP forwarder to PostgreSQL that can restart (drop every connection) or
    black-hole (accept, and forward nothing either way)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.blackholed = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()  # an RST, as a restarted server's sockets give
        self._writers.clear()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.blackholed:  # the connection opens, then nothing ever answers
            while await reader.read(65536):
                pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if not self.blackholed:
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
async def proxied(base_settings: dict[str, Any]) -> AsyncIterator[tuple[FaultyProxy, str]]:
    url = make_url(str(base_settings["database_url"]))
    if not url.drivername.startswith("postgres"):
        pytest.skip("needs PostgreSQL behind a proxy (TESSERA_TEST_DATABASE_URL), as in CI")
    proxy = FaultyProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    try:
        yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False)
    finally:
        await proxy.stop()


async def test_a_database_restart_under_load_gives_no_500_and_loses_no_usage_event(
        base_settings: dict[str, Any], proxied: tuple[FaultyProxy, str]) -> None:
    proxy, url = proxied
    settings = {**base_settings, "database_url": url, "usage_flush_seconds": 0.05,
                "db_connect_timeout_seconds": 2, "db_statement_timeout_seconds": 3}
    statuses: Counter[int] = Counter()
    async with running_app(**settings) as app, client_for(app) as client:
        reader, token = await registered_token(client)
        user, _ = await registered_token(client)  # logs in again and again: its own account
        stop = asyncio.Event()

        async def reads() -> None:
            while not stop.is_set():
                response = await client.get("/me/consents", headers=bearer(token))
                statuses[response.status_code] += 1

        async def logins() -> None:
            while not stop.is_set():
                statuses[(await login(client, user["email"])).status_code] += 1

        tasks = [asyncio.create_task(reads()) for _ in range(6)]
        tasks += [asyncio.create_task(logins()) for _ in range(3)]
        for _ in range(4):
            await asyncio.sleep(0.5)
            await proxy.restart()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[200] > 0
        accepted = app.state.tessera.usage.accepted
    # Leaving the app flushed the rest (the database is fine again).
    stored = sum([await asyncio.to_thread(count_usage, str(base_settings["database_url"]), uid)
                  for uid in (reader["id"], user["id"])])
    assert stored >= accepted, f"{accepted - stored} of {accepted} usage events lost"


async def test_a_partition_answers_503_within_the_timeouts(
        base_settings: dict[str, Any], proxied: tuple[FaultyProxy, str]) -> None:
    proxy, url = proxied
    settings = {**base_settings, "database_url": url,
                "db_connect_timeout_seconds": 1, "db_statement_timeout_seconds": 2}
    async with running_app(**settings) as app, client_for(app, timeout=30) as client:
        user, token = await registered_token(client)
        proxy.blackholed = True
        # Without timeouts these would wait for the partition's end (TCP's own: minutes).
        for request in (lambda: client.get("/me/consents", headers=bearer(token)),
                        lambda: login(client, user["email"])):
            response = await asyncio.wait_for(request(), timeout=20)
            assert_problem(response, 503, "unavailable")
        ready = await asyncio.wait_for(client.get("/readyz"), timeout=20)
        assert ready.status_code == 503
        proxy.blackholed = False
        await proxy.restart()
        for _ in range(100):
            if (await client.get("/me/consents", headers=bearer(token))).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.get("/me/consents", headers=bearer(token))).status_code == 200
        assert app.state.tessera.engine.pool.timeout() <= 1
