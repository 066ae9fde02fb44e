"""Problem details (RFC 9457): raise `Problem` anywhere, rendered here in one place."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

log = logging.getLogger("tessera.errors")

PROBLEM_JSON = "application/problem+json"

# Codes for errors raised by the framework itself rather than by tessera's code.
_STATUS_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_attempts",
    500: "internal_error",
    503: "unavailable",
}


class Problem(Exception):
    """An error with an HTTP status and a stable snake_case `code`."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}


def not_authenticated(detail: str = "A valid token is required.") -> Problem:
    return Problem(401, "not_authenticated", detail, headers={"WWW-Authenticate": "Bearer"})


def problem_body(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return {"type": "about:blank", "title": title, "status": status, "detail": detail,
            "code": code, **extra}


def problem_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    response = JSONResponse(
        problem_body(status, code, detail, **extra), status_code=status, headers=headers,
        media_type=PROBLEM_JSON,
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def _loc(loc: tuple[Any, ...] | list[Any]) -> list[Any]:
    return [part for part in loc]


def _msg(error: dict[str, Any]) -> str:
    # Never echo the offending input: it may be a password.
    return str(error.get("msg", "invalid value"))


async def _problem_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.code, exc.detail, exc.headers, **exc.extra)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": _loc(e.get("loc", ())), "msg": _msg(e)} for e in exc.errors()]
    return problem_response(422, "validation_error", "The request is not valid.", errors=errors)


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if type(exc.__cause__).__name__ == "BodyTooLarge":  # FastAPI wraps body-read errors in a 400
        return problem_response(413, "payload_too_large", "The request body is too large.")
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return problem_response(400, "malformed_body", "The request body could not be parsed.")
    code = _STATUS_CODES.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return problem_response(exc.status_code, code, detail, dict(exc.headers or {}))


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(500, "internal_error", "The server could not complete the request.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _problem_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled_handler)


async def _unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    # A backing store is down: fail closed, never let a request through unchecked.
    log.warning("backing store unavailable on %s: %s", request.url.path, type(exc).__name__)
    return problem_response(503, "unavailable", "A backing service is unavailable; retry later.",
                            {"Retry-After": "1"})


async def _redis_reply_handler(request: Request, exc: Exception) -> JSONResponse:
    # MISCONF (a failed snapshot on a full disk), READONLY, OOM: Redis takes no writes now.
    from tessera.stores.durability import is_write_refusal

    if is_write_refusal(exc):
        return await _unavailable_handler(request, exc)
    return await _unhandled_handler(request, exc)


async def _dbapi_handler(request: Request, exc: Exception) -> JSONResponse:
    from tessera.stores.db import is_unavailable

    if is_unavailable(exc):
        return await _unavailable_handler(request, exc)
    return await _unhandled_handler(request, exc)


def install_unavailable_handlers(app: FastAPI) -> None:
    import redis.exceptions
    import sqlalchemy.exc

    from tessera.stores.durability import WritesRefused

    app.add_exception_handler(redis.exceptions.ResponseError, _redis_reply_handler)
    # A connection that a database restart terminated reaches here as a plain DBAPIError.
    app.add_exception_handler(sqlalchemy.exc.DBAPIError, _dbapi_handler)
    app.add_exception_handler(WritesRefused, _unavailable_handler)

    for exc_type in (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.BusyLoadingError,
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        sqlalchemy.exc.DisconnectionError,
        sqlalchemy.exc.TimeoutError,
        ConnectionError,
        TimeoutError,
    ):
        app.add_exception_handler(exc_type, _unavailable_handler)


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string", "description": "stable snake_case error code"},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "loc": {"type": "array", "items": {}}, "msg": {"type": "string"}}}},
    },
    "additionalProperties": True,
}

_DESCRIPTIONS = {
    400: "malformed request", 401: "not authenticated", 403: "forbidden",
    404: "not found", 405: "method not allowed", 409: "conflict", 413: "payload too large",
    415: "unsupported media type", 422: "validation error", 429: "too many attempts",
    500: "internal error", 503: "a backing service is unavailable",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of problem+json answers, for routers and routes."""
    return {status: {"description": _DESCRIPTIONS.get(status, "error"),
                     "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}}
            for status in statuses}


def problem_doc(codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """Route-level problem declarations naming the `code`s each status carries."""
    return {status: {"description": description,
                     "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}}
            for status, description in codes.items()}
