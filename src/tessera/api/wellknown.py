"""Public documents: JWKS, tracking status (W3C TPE), GPC, the current policy."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.responses import JSONResponse

from tessera.api.deps import KeysDep, PolicyDep, SettingsDep
from tessera.errors import problem_responses
from tessera.timeutil import rfc3339

router = APIRouter(tags=["public"], responses=problem_responses(503))


@router.get("/.well-known/jwks.json")
async def jwks(request: Request, keys: KeysDep, settings: SettingsDep) -> Response:
    await keys.maybe_refresh()
    etag = f'"{keys.jwks_fingerprint}"'
    headers = {"Cache-Control": f"public, max-age={int(settings.keys_cache_seconds)}",
               "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return JSONResponse(keys.jwks(), headers=headers)


@router.get("/.well-known/dnt/", response_class=Response, responses={200: {
    "description": "W3C Tracking Status Resource",
    "content": {"application/tracking-status+json": {"schema": {
        "type": "object", "properties": {"tracking": {"type": "string"}}}}}}})
async def tracking_status() -> Response:
    # The status is per response (the Tk header); the resource says so with "?".
    return JSONResponse({"tracking": "?"}, media_type="application/tracking-status+json")


@router.get("/.well-known/gpc.json")
async def gpc(policies: PolicyDep) -> dict[str, object]:
    state = await policies.get()
    return {"gpc": True, "lastUpdate": rfc3339(state.current.published_at)[:10]}


@router.get("/policy")
async def policy(policies: PolicyDep) -> dict[str, object]:
    state = await policies.get()
    return {"version": state.current.version,
            "last_updated": rfc3339(state.current.published_at),
            "substantial": state.current.substantial}
