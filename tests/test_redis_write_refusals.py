"""A full disk: Redis refuses writes with real MISCONF replies (its snapshot failed on a full
tmpfs). Logouts answer 503, not 500; no session is accepted while a logout cannot be done;
/readyz tells the truth; once the disk has room, the refused logouts are done before any
token is accepted again."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    client_for,
    registered_token,
    running_app,
)
from tests.servers import RedisServer, redis_server


class FullDisk:
    """A 1 MiB tmpfs, filled; the test's redis-server snapshots into it and fails."""

    def __init__(self, base: Path, redis: RedisServer) -> None:
        self.mount = base / "full"
        self.redis = redis
        self.home = str(redis.dir)

    def __enter__(self) -> FullDisk:
        self.mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(self.mount)],
                       check=True)
        with open(self.mount / "fill", "wb") as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        return self

    def fill(self) -> None:
        """Redis's next snapshot goes to the full disk and fails: MISCONF from then on."""
        client = self.redis.client()
        client.config_set("dir", str(self.mount))
        client.bgsave()
        deadline = time.monotonic() + 10
        while client.info("persistence")["rdb_last_bgsave_status"] != "err":
            assert time.monotonic() < deadline, "the snapshot did not fail"
            time.sleep(0.05)
        with pytest.raises(sync_redis.ResponseError, match="MISCONF"):
            client.set("probe", "1")
        client.close()

    def free(self) -> None:
        client = self.redis.client()
        client.config_set("dir", self.home)
        client.bgsave()
        deadline = time.monotonic() + 10
        while client.info("persistence")["rdb_last_bgsave_status"] != "ok":
            assert time.monotonic() < deadline, "the snapshot did not succeed"
            time.sleep(0.05)
        client.close()

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.mount)], check=False)


@pytest.fixture
def misconf_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, FullDisk]]:
    # Snapshots as well as the append-only file: a failed snapshot stops writes (the default
    # stop-writes-on-bgsave-error yes).
    with redis_server(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always",
                      "--save", "3600", "1") as redis, FullDisk(tmp_path, redis) as disk:
        yield redis, disk


async def test_a_full_disk_never_lets_a_logged_out_token_work(
        base_settings: dict[str, Any], misconf_redis: tuple[RedisServer, FullDisk]) -> None:
    redis, disk = misconf_redis
    settings = {**base_settings, "redis_url": redis.url, "redis_durability": "require"}
    # A second deployment on the same database and another Redis (the session's) must leave
    # this Redis's refused deletions alone.
    async with running_app(**settings) as app, running_app(**base_settings), \
            client_for(app) as client:
        _, logout_token = await registered_token(client)
        _, all_token = await registered_token(client)
        _, deactivate_token = await registered_token(client)
        _, delete_token = await registered_token(client)
        _, bystander = await registered_token(client)
        for token in (logout_token, all_token, deactivate_token, delete_token, bystander):
            assert (await client.get("/me", headers=bearer(token))).status_code == 200

        disk.fill()
        assert_problem(await client.post("/auth/logout", headers=bearer(logout_token)),
                       503, "unavailable")
        # The logout could not be done: tessera accepts no session, this one least of all.
        for token in (logout_token, bystander):
            assert_problem(await client.get("/me", headers=bearer(token)), 503, "unavailable")
            assert_problem(await client.post(
                "/auth/introspect", data={"token": token},
                headers=bearer(base_settings["service_keys"][0])), 503, "unavailable")
        for path in ("/auth/logout-all", "/me/deactivate"):
            token = all_token if path == "/auth/logout-all" else deactivate_token
            assert_problem(await client.post(path, headers=bearer(token)), 503, "unavailable")
        assert_problem(await client.request("DELETE", "/me", json={"password": PASSWORD},
                                            headers=bearer(delete_token)), 503, "unavailable")
        await asyncio.sleep(2.5)  # the other deployment's gate reads the table meanwhile
        ready = await client.get("/readyz")
        body = assert_problem(ready, 503, "unavailable")
        assert body["checks"] == {"database": "ok", "redis": "down"}
        assert "MISCONF" in body["detail"]

        disk.free()
        for _ in range(100):
            if (await client.get("/me", headers=bearer(bystander))).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/me", headers=bearer(bystander))).status_code == 200
        # The logout that answered 503 was done before any token was accepted again.
        for token in (logout_token, all_token, deactivate_token):
            assert_problem(await client.get("/me", headers=bearer(token)), 401,
                           "not_authenticated")


async def test_every_instance_stops_accepting_sessions_on_a_redis_refusing_writes(
        base_settings: dict[str, Any], misconf_redis: tuple[RedisServer, FullDisk]) -> None:
    redis, disk = misconf_redis
    settings = {**base_settings, "redis_url": redis.url, "redis_durability": "require"}
    async with running_app(**settings) as app, client_for(app) as client:
        _, token = await registered_token(client)
        assert (await client.get("/me", headers=bearer(token))).status_code == 200
        disk.fill()
        # No logout failed here: the probe write finds the refusal within about a second.
        for _ in range(60):
            if (await client.get("/me", headers=bearer(token))).status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert_problem(await client.get("/me", headers=bearer(token)), 503, "unavailable")
        assert_problem(await client.post("/auth/logout", headers=bearer(token)), 503,
                       "unavailable")


def test_sigterm_on_a_redis_refusing_writes_keeps_the_usage_events(
        base_settings: dict[str, Any], misconf_redis: tuple[RedisServer, FullDisk],
        tmp_path: Path) -> None:
    import httpx

    from tests.conftest import new_email
    from tests.servers import session_server_env, tessera_server
    from tests.test_live_server import count_usage

    redis, disk = misconf_redis
    # The usage events wait in memory for the shutdown flush (the flusher waits 60 s).
    env = session_server_env(base_settings, tmp_path, TESSERA_REDIS_URL=redis.url,
                             TESSERA_REDIS_DURABILITY="require",
                             TESSERA_USAGE_FLUSH_SECONDS="60")
    with tessera_server(env, tmp_path / "logs") as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            email = new_email()
            user = http.post("/auth/register", json={"email": email, "password": PASSWORD,
                                                      "is_adult": True}).json()
            token = http.post("/auth/login", json={"email": email, "password": PASSWORD}
                              ).json()["access_token"]
            for _ in range(5):
                assert http.get("/me", headers=bearer(token)).status_code == 200
            disk.fill()
            assert http.post("/auth/logout", headers=bearer(token)).status_code == 503
        assert server.stop() in (0, 143, -15)
    assert count_usage(str(base_settings["database_url"]), user["id"]) >= 5


# --- two instances: the refused deletion is kept in the database, not in one process ------


def _wait_for(get: Any, status: int, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (code := get().status_code) != status:
        assert time.monotonic() < deadline, f"{what}: still {code}"
        time.sleep(0.05)


def _two_instance_env(base_settings: dict[str, Any], redis: RedisServer, tmp_path: Path,
                      name: str) -> dict[str, str]:
    from tests.servers import session_server_env

    return session_server_env(base_settings, tmp_path / name, TESSERA_REDIS_URL=redis.url,
                              TESSERA_REDIS_DURABILITY="require")


def test_a_logout_refused_on_one_instance_holds_on_another_after_a_crash(
        base_settings: dict[str, Any], misconf_redis: tuple[RedisServer, FullDisk],
        tmp_path: Path) -> None:
    """Logout on A while Redis refuses writes; B refuses the token too; A is killed (by pid)
    before Redis takes writes again; B then does A's logout before it accepts any token."""
    import httpx

    from tests.conftest import new_email
    from tests.servers import tessera_server

    redis, disk = misconf_redis
    logs = tmp_path / "logs"
    with tessera_server(_two_instance_env(base_settings, redis, tmp_path, "a"), logs,
                        name="a") as a, \
            tessera_server(_two_instance_env(base_settings, redis, tmp_path, "b"), logs,
                           name="b") as b, \
            httpx.Client(base_url=a.url, timeout=10) as on_a, \
            httpx.Client(base_url=b.url, timeout=10) as on_b:
        tokens = {}
        for who in ("logout", "all", "bystander"):
            email = new_email()
            assert on_a.post("/auth/register", json={
                "email": email, "password": PASSWORD, "is_adult": True}).status_code == 201
            tokens[who] = on_a.post("/auth/login", json={
                "email": email, "password": PASSWORD}).json()["access_token"]
            assert on_b.get("/me", headers=bearer(tokens[who])).status_code == 200

        disk.fill()
        assert on_a.post("/auth/logout", headers=bearer(tokens["logout"])).status_code == 503
        assert on_a.post("/auth/logout-all", headers=bearer(tokens["all"])).status_code == 503
        # B learns that Redis refuses writes (no request of B failed): it accepts none.
        _wait_for(lambda: on_b.get("/me", headers=bearer(tokens["logout"])), 503,
                  "B accepts a token A could not log out", timeout=5)
        assert on_b.get("/me", headers=bearer(tokens["bystander"])).status_code == 503
        assert on_b.post("/auth/introspect", data={"token": tokens["all"]},
                         headers=bearer(base_settings["service_keys"][0])).status_code == 503

        a.proc.kill()  # SIGKILL by pid: A's memory is gone
        a.proc.wait()
        disk.free()
        _wait_for(lambda: on_b.get("/me", headers=bearer(tokens["bystander"])), 200,
                  "B does not accept sessions again")
        for who in ("logout", "all"):
            response = on_b.get("/me", headers=bearer(tokens[who]))
            assert response.status_code == 401, (who, response.status_code)
            assert on_b.post("/auth/introspect", data={"token": tokens[who]},
                             headers=bearer(base_settings["service_keys"][0])
                             ).json() == {"active": False}
        assert on_b.get("/readyz").status_code == 200


def test_a_logout_refused_before_a_crash_is_done_by_the_next_start(
        base_settings: dict[str, Any], misconf_redis: tuple[RedisServer, FullDisk],
        tmp_path: Path) -> None:
    """The only instance takes a logout Redis refuses and is killed (by pid); Redis takes
    writes again; the next instance does the logout at start-up."""
    import httpx

    from tests.conftest import new_email
    from tests.servers import tessera_server

    redis, disk = misconf_redis
    env = _two_instance_env(base_settings, redis, tmp_path, "a")
    logs = tmp_path / "logs"
    email = new_email()
    with tessera_server(env, logs, name="first") as first, \
            httpx.Client(base_url=first.url, timeout=10) as http:
        assert http.post("/auth/register", json={
            "email": email, "password": PASSWORD, "is_adult": True}).status_code == 201
        token = http.post("/auth/login", json={"email": email, "password": PASSWORD}
                          ).json()["access_token"]
        assert http.get("/me", headers=bearer(token)).status_code == 200
        disk.fill()
        assert http.post("/auth/logout", headers=bearer(token)).status_code == 503
        first.proc.kill()
        first.proc.wait()
    disk.free()
    with tessera_server(env, logs, name="second") as second, \
            httpx.Client(base_url=second.url, timeout=10) as http:
        assert http.get("/me", headers=bearer(token)).status_code == 401


def test_sigterm_on_a_full_disk_keeps_the_usage_events(
        base_settings: dict[str, Any], tmp_path: Path) -> None:
    """The embedded defaults on one full disk: tessera's data folder (the embedded
    redis-server's files and, on the embedded path, the SQLite database) is a small tmpfs,
    filled while events wait in memory; SIGTERM by pid; the events are written (before, the
    shutdown flush met `database or disk is full`, the events were lost and the rest of the
    shutdown was skipped). On the PostgreSQL path the database is not on that disk."""
    import httpx

    from tests.conftest import new_email
    from tests.servers import session_server_env, tessera_server
    from tests.test_live_server import count_usage

    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(data)], check=True)
    try:
        database_url = str(base_settings["database_url"])
        if database_url.startswith("sqlite"):
            database_url = f"sqlite+aiosqlite:///{data / 'tessera.db'}"
        env = session_server_env(base_settings, data, TESSERA_DATABASE_URL=database_url,
                                 TESSERA_REDIS_DURABILITY="require",
                                 TESSERA_USAGE_FLUSH_SECONDS="60")
        env.pop("TESSERA_REDIS_URL")  # the embedded redis-server, in the data folder
        with tessera_server(env, tmp_path / "logs") as server, \
                httpx.Client(base_url=server.url, timeout=10) as http:
            email = new_email()
            user = http.post("/auth/register", json={"email": email, "password": PASSWORD,
                                                      "is_adult": True}).json()
            token = http.post("/auth/login", json={"email": email, "password": PASSWORD}
                              ).json()["access_token"]
            for _ in range(5):
                assert http.get("/me", headers=bearer(token)).status_code == 200
            with open(data / "fill", "wb") as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            assert server.stop() in (0, 143, -15)
            log = server.log()
        (data / "fill").unlink()
        assert count_usage(database_url, user["id"]) >= 5, log[-3000:]
        assert "Application shutdown failed" not in log
        if database_url.startswith("sqlite"):  # the flush met the full disk, then had room
            assert "the disk reserve is freed for the shutdown flush" in log
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)
