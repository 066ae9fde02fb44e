"""The OpenAPI document: user-authenticated operations declare the OAuth2 password flow, so
the "Authorize" button of /docs logs in through POST /auth/login.

Declared here, from the routes' dependencies, rather than by a security dependency that
FastAPI would solve on every request."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from tessera.api.deps import USER_AUTH_DEPENDENCIES
from tessera.api.lean import OPENAPI as LEAN_OPERATIONS

SCHEME = "OAuth2PasswordBearer"


def _uses_user_auth(dependant: Dependant) -> bool:
    return any(dep.call in USER_AUTH_DEPENDENCIES or _uses_user_auth(dep)
               for dep in dependant.dependencies)


def api_routes(routes: list[Any]) -> list[APIRoute]:
    """Every APIRoute, also inside included routers (routers are included without a prefix
    of their own here, so a route's path is the full path)."""
    found: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif (inner := getattr(route, "original_router", None)) is not None:
            found.extend(api_routes(inner.routes))
    return found


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME] = {
            "type": "oauth2", "flows": {"password": {"tokenUrl": "/auth/login", "scopes": {}}}}
        for route in api_routes(app.routes):
            if _uses_user_auth(route.dependant):
                for method in route.methods or ():
                    operation = schema["paths"].get(route.path_format, {}).get(method.lower())
                    if operation is not None:
                        operation["security"] = [{SCHEME: []}]
        for path, operations in LEAN_OPERATIONS.items():  # the plain ASGI endpoints
            schema["paths"].setdefault(path, {}).update(operations)
        schema["paths"] = dict(sorted(schema["paths"].items()))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
