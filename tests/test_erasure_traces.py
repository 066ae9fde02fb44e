"""Issue 12.7: after DELETE /me or a minor erasure the email, IP and user agent are gone from
the SQLite file and its WAL (secure_delete, a TRUNCATE checkpoint) and from the Redis
snapshot (a BGSAVE after the user's keys are deleted). Read from the real files on disk."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import update

from tessera.stores.models import User
from tessera.stores.scrub import checkpoint_sqlite
from tests.conftest import PASSWORD, bearer, register, registered_token


def sqlite_files(app: FastAPI) -> list[Path]:
    url = app.state.tessera.settings.resolved_database_url
    path = Path(url.split(":///", 1)[1])
    return [p for p in (path, Path(f"{path}-wal")) if p.exists()]


def holds(path: Path, needle: bytes) -> bool:
    """Whether the file holds the bytes, read by another process: closing a file this process
    opened would drop the POSIX locks its SQLite connections hold on it (and corrupt it)."""
    return subprocess.run(["grep", "-q", "-F", "-a", needle.decode(), str(path)],
                          check=False).returncode == 0


async def make_traced_user(client: httpx.AsyncClient, marker: str) -> tuple[dict, str]:
    user = await register(client, f"trace-{marker}@example.com")
    response = await client.post("/auth/login", json={"email": user["email"], "password": PASSWORD},
                                 headers={"User-Agent": f"agent-{marker}"})
    token = response.json()["access_token"]
    assert (await client.get("/me", headers=bearer(token))).status_code == 200  # cached profile
    return user, token


@pytest.mark.parametrize("how", ["delete_me", "minor_erasure"])
async def test_the_sqlite_file_and_wal_keep_no_email_after_erasure(
        app: FastAPI, client: httpx.AsyncClient, smtp: Any, how: str) -> None:
    if app.state.tessera.engine.dialect.name != "sqlite":
        pytest.skip("the SQLite files: embedded path only")
    marker = secrets.token_hex(8)
    user, token = await make_traced_user(client, marker)
    needle = marker.encode()
    assert any(holds(p, needle) for p in sqlite_files(app))  # written, so a real test
    await checkpoint_sqlite(app.state.tessera.engine)  # into the database file itself
    assert holds(sqlite_files(app)[0], needle)
    if how == "delete_me":
        deleted = await client.request("DELETE", "/me", json={"password": PASSWORD},
                                       headers=bearer(token))
        assert deleted.status_code == 204
        # The account-deleted notice holds the address until it is sent (then it is gone).
        await smtp.wait_for(user["email"], "account_deleted", within=60)
        await asyncio.sleep(0.3)
    else:
        admin_user, admin = await registered_token(client)
        async with app.state.tessera.db_factory() as db:
            await db.exec(update(User).where(User.id == admin_user["id"]).values(is_admin=True))
            await db.commit()
        erased = await client.post(f"/admin/users/{user['id']}/minor", headers=bearer(admin))
        assert erased.status_code == 204
    for path in sqlite_files(app):
        assert not holds(path, needle), f"the email is still in {path.name}"


async def test_the_redis_snapshot_keeps_no_email_or_user_agent_after_deletion(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    t = app.state.tessera
    if t.settings.redis_url and "redis.sock" not in t.settings.redis_url:
        pytest.skip("reads the snapshot file of the embedded redis-server the tests started")
    redis = t.redis
    directory = (await redis.config_get("dir"))["dir"]
    snapshot = Path(directory) / (await redis.config_get("dbfilename"))["dbfilename"]
    await redis.config_set("rdbcompression", "no")  # so the snapshot can be searched
    # The embedded server keeps an append-only file and no snapshots: configure snapshots
    # for this test, as an operator's Redis may have them.
    saves = (await redis.config_get("save"))["save"]
    await redis.config_set("save", "3600 1")
    marker = secrets.token_hex(8)
    try:
        user, token = await make_traced_user(client, marker)

        async def saved() -> None:
            """A snapshot that began now (BGSAVE marks itself in progress before answering)."""
            async def done() -> None:
                for _ in range(1200):
                    info = await redis.info("persistence")
                    if not (info["rdb_bgsave_in_progress"] or info["aof_rewrite_in_progress"]):
                        return
                    await asyncio.sleep(0.05)

            await done()
            await redis.bgsave()
            await done()

        await saved()
        assert marker.encode() in snapshot.read_bytes()  # the snapshot held them
        deleted = await client.request("DELETE", "/me", json={"password": PASSWORD},
                                       headers=bearer(token))
        assert deleted.status_code == 204
        await t.scrubber.idle()  # the snapshot tessera asked for after the deletion
        assert marker.encode() not in snapshot.read_bytes()
    finally:
        await redis.config_set("save", saves)
        await redis.config_set("rdbcompression", "yes")


async def test_sqlite_connections_delete_securely(app: FastAPI) -> None:
    """secure_delete is on for every connection, whatever the SQLite build's default."""
    engine = app.state.tessera.engine
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite only")
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA secure_delete")).scalar() == 1


async def test_the_append_only_file_keeps_no_email_after_deletion(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """With AOF on, the deletion is followed by a BGREWRITEAOF: the file no longer holds the
    commands that wrote the user's data."""
    t = app.state.tessera
    if t.settings.redis_url and "redis.sock" not in t.settings.redis_url:
        pytest.skip("reads the files of the embedded redis-server the tests started")
    redis = t.redis
    directory = Path((await redis.config_get("dir"))["dir"])
    name = (await redis.config_get("appendfilename"))["appendfilename"]
    if (await redis.config_get("appenddirname")).get("appenddirname"):
        pytest.skip("Redis 7 multi-part AOF: the embedded server is 6.2")
    appendonly = (await redis.config_get("appendonly"))["appendonly"]
    await redis.config_set("rdbcompression", "no")
    await redis.config_set("appendonly", "yes")
    try:
        async def rewrites_done() -> None:
            for _ in range(1200):
                info = await redis.info("persistence")
                if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                    return
                await asyncio.sleep(0.05)

        await rewrites_done()  # turning AOF on starts with a rewrite
        marker = secrets.token_hex(8)
        user, token = await make_traced_user(client, marker)
        await asyncio.sleep(1.2)  # appendfsync everysec (always on the embedded server)
        assert holds(directory / name, marker.encode())
        deleted = await client.request("DELETE", "/me", json={"password": PASSWORD},
                                       headers=bearer(token))
        assert deleted.status_code == 204
        await t.scrubber.idle()
        await rewrites_done()
        assert not holds(directory / name, marker.encode())
    finally:
        await redis.config_set("appendonly", appendonly)  # the embedded server keeps it on
        await redis.config_set("rdbcompression", "yes")
