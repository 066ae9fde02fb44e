"""The usage log's storage (app/usage.py): one segment per user and flush, purged event by
event at the retention cutoff, and migration 0002 that moved the per-request rows into
segments without losing one. Real SQLite or PostgreSQL, as the session runs."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from fastapi import FastAPI
from sqlmodel import col, select

from tessera.config import normalise_database_url
from tessera.ops.migrate import alembic_config
from tessera.stores.models import UsageSegment
from tessera.stores.usage import purge_usage
from tests.conftest import bearer, client_for, registered_token


def micros(value: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)


async def segments_of(app: FastAPI, user_id: str) -> list[UsageSegment]:
    async with app.state.tessera.db_factory() as db:
        return list((await db.exec(select(UsageSegment).where(UsageSegment.user_id == user_id)
                                   .order_by(col(UsageSegment.id)))).all())


async def test_one_flush_writes_one_segment_per_user(app: FastAPI) -> None:
    async with client_for(app, ip="198.51.100.4") as client:
        (a, token_a), (b, token_b) = await registered_token(client), await registered_token(client)
        await app.state.tessera.usage.flush()
        for _ in range(3):
            await client.get("/me", headers=bearer(token_a))
        await client.get("/me/consents", headers=bearer(token_b))
        await app.state.tessera.usage.flush()
    (seg_a,), (seg_b,) = await segments_of(app, a["id"]), await segments_of(app, b["id"])
    assert seg_a.count == 3 and len(json.loads(seg_a.events)) == 3
    assert seg_b.count == 1 and json.loads(seg_b.events)[0][1:] == [
        "198.51.100.4", "GET", "/me/consents", "testserver", 200,
        json.loads(seg_b.events)[0][6]]
    assert seg_a.first_at <= seg_a.last_at


async def test_purge_cuts_a_segment_at_the_cutoff(app: FastAPI) -> None:
    async with client_for(app) as client:
        user, token = await registered_token(client)
        await app.state.tessera.usage.flush()
        now = time.time_ns() // 1000
        old, new = now - 91 * 86400 * 10**6, now - 89 * 86400 * 10**6
        events = [[old, "10.0.0.1", "GET", "/me", "h", 200, 10],
                  [new, "10.0.0.2", "GET", "/me", "h", 200, 20]]
        async with app.state.tessera.db_factory() as db:
            db.add(UsageSegment(user_id=user["id"], count=2, events=json.dumps(events),
                                first_at=micros(old), last_at=micros(new)))
            db.add(UsageSegment(user_id=user["id"], count=1, events=json.dumps(events[:1]),
                                first_at=micros(old), last_at=micros(old)))
            await db.commit()
            assert await purge_usage(db, 90) == 2  # the old event of each segment
        (left,) = await segments_of(app, user["id"])
        assert left.count == 1 and json.loads(left.events) == events[1:]
        assert left.first_at.replace(tzinfo=UTC) == micros(new)
        export = (await client.get("/me/export", headers={**bearer(token), "DNT": "1"})).json()
        assert [(e["ip"], e["bytes"]) for e in export["usage_log"]] == [("10.0.0.2", 20)]


def test_migration_0002_moves_every_event_into_segments(tmp_path: Path,
                                                       base_settings: dict[str, Any]) -> None:
    url = base_settings["database_url"]
    if "postgres" in url:  # a database of this test's own: the session's one stays at head
        asyncio.run(_execute(url, "DROP DATABASE IF EXISTS tessera_migration_test",
                             "CREATE DATABASE tessera_migration_test", autocommit=True))
        url = url.rsplit("/", 1)[0] + "/tessera_migration_test"
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'migrate.db'}"
    command.upgrade(alembic_config(url), "0001")
    now = datetime.now(UTC)
    start = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    asyncio.run(_execute(
        url, ("INSERT INTO users (id, email, email_key, is_active, is_admin, created_at, "
              "updated_at, policy_seq, restrict_processing, object_to_processing) VALUES "
              "('u1', 'a@b.c', 'a@b.c', true, false, :t, :t, 0, false, false)", {"t": now}),
        ("INSERT INTO usage_events (user_id, at, ip, method, path, host, status, bytes) "
         "VALUES ('u1', :at, '192.0.2.1', 'GET', '/me', 'api.example', 200, :bytes)",
         [{"at": start + timedelta(seconds=i), "bytes": i} for i in range(1203)])))

    command.upgrade(alembic_config(url), "head")
    segments = asyncio.run(_execute(url, "SELECT count, events FROM usage_segments ORDER BY id"))
    assert [s[0] for s in segments] == [1000, 203]
    events = [e for s in segments for e in json.loads(s[1])]
    assert [e[6] for e in events] == list(range(1203))
    assert events[0] == [int(start.timestamp()) * 10**6, "192.0.2.1", "GET", "/me",
                         "api.example", 200, 0]

    command.downgrade(alembic_config(url), "0001")  # and back, losing nothing either
    back = asyncio.run(_execute(url, "SELECT bytes FROM usage_events ORDER BY at"))
    assert [row[0] for row in back] == list(range(1203))


async def _execute(url: str, *statements: Any, autocommit: bool = False) -> list[Any]:
    """Runs the statements (SQL, or (SQL, parameters)); returns the last one's rows."""
    from sqlalchemy.ext.asyncio import create_async_engine

    kw = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    engine = create_async_engine(normalise_database_url(url), **kw)
    rows: list[Any] = []
    try:
        async with engine.begin() as conn:
            for statement in statements:
                sql, params = statement if isinstance(statement, tuple) else (statement, None)
                result = await conn.execute(sa.text(sql), params)
                rows = list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()
    return rows


async def test_forget_waits_for_a_flush_in_flight_and_drops_later_events(app: FastAPI) -> None:
    usage = app.state.tessera.usage
    async with client_for(app) as client:
        user, token = await registered_token(client)
        await client.get("/me", headers=bearer(token))
        flushing = asyncio.ensure_future(usage.flush())
        await asyncio.sleep(0)  # the flush has taken the batch and is writing it
        await usage.forget(user["id"])
        assert flushing.done()  # so the caller's delete comes after that write
        await client.get("/me", headers=bearer(token))  # still being served: not recorded
        assert all(e[0] != user["id"] for e in usage._buffer)


async def test_stop_writes_the_batch_of_a_flush_in_flight(app: FastAPI) -> None:
    from tessera.stores.usage import UsageRecorder

    async with client_for(app) as client:
        user, _ = await registered_token(client)
    recorder = UsageRecorder(app.state.tessera.db_factory, flush_events=1, flush_seconds=60)
    recorder.start()
    for _ in range(5):
        recorder.record(user_id=user["id"], ip="192.0.2.9", method="GET", path="/me",
                        host="h", status=200, nbytes=1)
    await asyncio.sleep(0)  # the flusher wakes and starts writing
    await recorder.stop()
    assert sum(s.count for s in await segments_of(app, user["id"])) == 5
