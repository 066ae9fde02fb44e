"""Operator endpoints: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.responses import JSONResponse, Response

from tessera.api.deps import EngineDep, MetricsDep, RedisDep, SessionsDep, SettingsDep
from tessera.errors import problem_body, problem_doc, problem_responses
from tessera.stores.durability import persistence_problem, write_problem

router = APIRouter(tags=["operations"], responses=problem_responses(503))


async def _check(coro: object) -> str:
    try:
        await asyncio.wait_for(coro, timeout=2)  # type: ignore[arg-type]
        return "ok"
    except Exception:
        return "down"


@router.get("/readyz", responses=problem_doc({503: "unavailable"}))
async def readyz(engine: EngineDep, redis: RedisDep, settings: SettingsDep,
                 sessions: SessionsDep) -> Response:
    async def db_ping() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    reasons: dict[str, str] = {}

    async def redis_check() -> None:
        # A write, not a PING: a Redis that refuses writes (MISCONF on a full disk, READONLY,
        # OOM) cannot end a session, so tessera is not ready on it.
        problem = await write_problem(redis)
        if problem is None and settings.redis_durability == "require":
            problem = await persistence_problem(redis)
        if problem is None and sessions.writes.failing and not await sessions.writes.replay():
            problem = f"Redis refused deletions that are not done yet ({sessions.writes.reason})"
        if problem is not None:
            reasons["redis"] = problem
            raise RuntimeError(problem)

    checks = {"database": await _check(db_ping()), "redis": await _check(redis_check())}
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ok", "checks": checks})
    down = ", ".join(f"{k} down ({reasons[k]})" if k in reasons else f"{k} down"
                     for k, v in checks.items() if v != "ok")
    return JSONResponse(problem_body(503, "unavailable", f"Not ready: {down}.",
                                     checks=checks),
                        status_code=503, media_type="application/problem+json",
                        headers={"Cache-Control": "no-store"})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
                             "description": "Prometheus text format"}})
async def metrics(registry: MetricsDep) -> Response:
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
