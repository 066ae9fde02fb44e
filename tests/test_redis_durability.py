"""A logout survives a crash of Redis (kill -9): the embedded server keeps an fsynced
append-only file, a supervisor starts it again, and tessera refuses a Redis that would
forget logouts (at start, and in /readyz)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tessera.ops.embedded import EmbeddedRedis
from tessera.stores.redis import create_redis
from tessera.stores.sessions import SessionRecord, SessionStore
from tests.conftest import PASSWORD, assert_problem, client_for, new_email, running_app
from tests.servers import (
    ROOT,
    free_port,
    redis_server,
    serve_command,
    session_server_env,
    tessera_server,
)


def embedded_redis_pid(tessera_pid: int) -> int:
    """The redis-server that this tessera process started (its child, by pid)."""
    for child in psutil.Process(tessera_pid).children(recursive=True):
        try:
            if "redis-server" in " ".join(child.cmdline()):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no embedded redis-server under this tessera")


def wait_ready(url: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False


async def test_deleted_sessions_stay_deleted_after_a_kill_9_of_the_embedded_redis(
        tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path / "data")
    url = embedded.start()
    store = SessionStore(create_redis(url))
    now = int(time.time())
    records = [SessionRecord(sid=f"s{i}", user_id="u1", token_hash="h", created_at=now,
                             expires_at=now + 3600) for i in range(5)]
    for record in records:
        assert await store.create(record, epoch=await store.epoch(record.user_id))
    await store.redis.save()  # a snapshot, as the old `--save 60 1` took now and then
    for record in records:
        assert await store.delete(record.user_id, record.sid)
    await store.redis.aclose()
    await asyncio.sleep(0.3)
    assert embedded.pid is not None
    os.kill(embedded.pid, signal.SIGKILL)
    embedded._proc.wait()  # type: ignore[union-attr]
    again = EmbeddedRedis(tmp_path / "data")
    store = SessionStore(create_redis(again.start()))
    try:
        for record in records:
            assert await store.get(record.user_id, record.sid) is None, "a logout came back"
    finally:
        await store.redis.aclose()
        again.stop()
        embedded.stop()


def test_five_logouts_survive_a_kill_9_of_the_embedded_redis_which_is_restarted(
        base_settings: dict[str, Any], tmp_path: Path) -> None:
    env = session_server_env(base_settings, tmp_path, TESSERA_REDIS_URL="",
                             TESSERA_REDIS_DURABILITY="require")
    with tessera_server(env, tmp_path / "logs") as server, \
            httpx.Client(base_url=server.url, timeout=10) as http:
        email = new_email()
        assert http.post("/auth/register", json={"email": email, "password": PASSWORD,
                                                 "is_adult": True}).status_code == 201
        tokens = [http.post("/auth/login", json={"email": email, "password": PASSWORD}
                            ).json()["access_token"] for _ in range(6)]
        kept = tokens.pop()
        redis_pid = embedded_redis_pid(server.proc.pid)
        import redis as sync_redis

        sync_redis.Redis(unix_socket_path=str(tmp_path / "redis.sock")).save()  # a snapshot
        for token in tokens:
            assert http.post("/auth/logout", headers={"Authorization": f"Bearer {token}"}
                             ).status_code == 204
        time.sleep(0.3)
        os.kill(redis_pid, signal.SIGKILL)
        # Nothing else starts it again: tessera's supervisor must.
        assert wait_ready(server.url), "the embedded Redis was not started again"
        assert embedded_redis_pid(server.proc.pid) != redis_pid
        for token in tokens:
            assert_problem(http.get("/me", headers={"Authorization": f"Bearer {token}"}),
                           401, "not_authenticated")
        assert http.get("/me", headers={"Authorization": f"Bearer {kept}"}).status_code == 200


def _serve(env: dict[str, str], timeout: float = 60) -> subprocess.Popen[str]:
    return subprocess.Popen(serve_command(free_port()), env=env, cwd=ROOT, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize(("redis_args", "named"), [
    (("--appendonly", "no", "--save", "60", "1"), "appendonly no"),
    (("--appendonly", "yes", "--appendfsync", "no", "--save", ""), "appendfsync no"),
    (("--appendonly", "yes", "--rename-command", "CONFIG", ""), "TESSERA_REDIS_DURABILITY=trusted"),
    (("--appendonly", "yes", "--save", "", "--maxmemory", "64mb", "--maxmemory-policy",
      "volatile-ttl"), "maxmemory-policy volatile-ttl"),
])
def test_serve_refuses_a_redis_that_may_forget_logouts(
        base_settings: dict[str, Any], tmp_path: Path, redis_args: tuple[str, ...],
        named: str) -> None:
    with redis_server(tmp_path / "redis", *redis_args) as redis:
        env = session_server_env(base_settings, tmp_path, TESSERA_REDIS_URL=redis.url,
                                 TESSERA_REDIS_DURABILITY="require")
        proc = _serve(env)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("tessera served on a Redis that may forget logouts") from None
        assert proc.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[-1].startswith("tessera: refusing to start: "), err
        assert named in lines[-1]
        # An operator who knows better says so.
        accepted = "trusted" if "CONFIG" in redis_args else "off"
        env["TESSERA_REDIS_DURABILITY"] = accepted
        with tessera_server(env, tmp_path / "logs") as server:
            assert httpx.get(server.url + "/readyz").status_code == 200


async def test_readyz_says_not_ready_when_redis_stops_persisting(base_settings, tmp_path) -> None:
    with redis_server(tmp_path / "redis", "--appendonly", "yes", "--save", "") as redis:
        settings = {**base_settings, "redis_url": redis.url, "redis_durability": "require"}
        async with running_app(**settings) as app, client_for(app) as client:
            assert (await client.get("/readyz")).status_code == 200
            redis.client().config_set("appendonly", "no")
            ready = await client.get("/readyz")
            body = assert_problem(ready, 503, "unavailable")
            assert body["checks"] == {"database": "ok", "redis": "down"}
            assert "append-only" in body["detail"]
            redis.client().config_set("appendonly", "yes")
            assert (await client.get("/readyz")).status_code == 200


async def test_the_app_itself_refuses_a_redis_that_forgets(base_settings, tmp_path) -> None:
    from tessera.stores.durability import RedisNotDurable

    with redis_server(tmp_path / "redis", "--appendonly", "no") as redis:
        with pytest.raises(RedisNotDurable):
            async with running_app(**{**base_settings, "redis_url": redis.url,
                                      "redis_durability": "require"}):
                pass


