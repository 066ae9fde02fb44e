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


class BodyTooLarge(Exception):
    """Raised by the edge's receive when a streamed body passes TESSERA_MAX_BODY_BYTES."""


# Every error tessera raises, by kind: its HTTP status and the stable `code` it answers
# with. The domain raises kinds; only this table knows statuses. A kind is its code but
# where one code answers with two statuses in the contract (a wrong password at login is
# 401, as the confirmation of a change 403).
ERRORS: dict[str, tuple[int, str]] = {
    "account_inactive": (403, "account_inactive"),
    "already_closed": (409, "already_closed"),
    "consent_required": (403, "consent_required"),
    "csrf_failed": (403, "csrf_failed"),
    "email_taken": (409, "email_taken"),
    "forbidden": (403, "forbidden"),
    "invalid_client": (401, "invalid_client"),
    "invalid_code": (401, "invalid_code"),
    "invalid_credential": (400, "invalid_credential"),
    "invalid_credentials": (401, "invalid_credentials"),
    "invalid_enrolment_code": (400, "invalid_code"),
    "invalid_mfa_token": (401, "invalid_token"),
    "invalid_token": (400, "invalid_token"),
    "email_not_verified": (403, "email_not_verified"),
    "invalid_request": (400, "invalid_request"),
    "malformed_body": (400, "malformed_body"),
    "mfa_not_enabled": (409, "mfa_not_enabled"),
    "mfa_required": (401, "mfa_required"),
    "no_pending_totp": (409, "no_pending_totp"),
    "not_authenticated": (401, "not_authenticated"),
    "not_found": (404, "not_found"),
    "policy_consent_required": (403, "policy_consent_required"),
    "policy_outdated": (409, "policy_outdated"),
    "too_many_attempts": (429, "too_many_attempts"),
    "totp_already_enabled": (409, "totp_already_enabled"),
    "unavailable": (503, "unavailable"),
    "underage": (422, "underage"),
    "unsupported_media_type": (415, "unsupported_media_type"),
    "validation_error": (422, "validation_error"),
    "version_exists": (409, "version_exists"),
    "wrong_password": (403, "invalid_credentials"),
    "reauthentication_required": (403, "reauthentication_required"),
}


class Problem(Exception):
    """A domain error: a kind from `ERRORS` (its stable `code` and HTTP status), a detail
    for people, optional headers and extra members of the problem document."""

    def __init__(
        self,
        kind: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.status, self.code = ERRORS[kind]
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}


def not_authenticated(detail: str = "A valid token is required.") -> Problem:
    return Problem("not_authenticated", detail, headers={"WWW-Authenticate": "Bearer"})


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
    if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps body-read errors in a 400
        return problem_response(413, "payload_too_large", "The request body is too large.")
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return problem_response(400, "malformed_body", "The request body could not be parsed.")
    code = _STATUS_CODES.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return problem_response(exc.status_code, code, detail, dict(exc.headers or {}))


async def _too_large_handler(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(413, "payload_too_large", "The request body is too large.")


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(500, "internal_error", "The server could not complete the request.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _problem_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(BodyTooLarge, _too_large_handler)
    app.add_exception_handler(Exception, _unhandled_handler)


async def _unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    # A backing store is down: fail closed, never let a request through unchecked.
    log.warning("backing store unavailable on %s: %s", request.url.path, type(exc).__name__)
    return unavailable_response()


def unavailable_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean a backing store is unreachable: answered 503 `unavailable`
    by the FastAPI routes and the lean handlers alike (see also `is_unavailable`)."""
    import redis.exceptions
    import sqlalchemy.exc

    from tessera.stores.durability import WritesRefused

    return (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.BusyLoadingError,
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        sqlalchemy.exc.DisconnectionError,
        sqlalchemy.exc.TimeoutError,
        ConnectionError,
        TimeoutError,
        WritesRefused,
    )


def is_unavailable(exc: BaseException) -> bool:
    """Whether an error means a store cannot serve now: unreachable, a Redis that refuses
    writes (MISCONF on a full disk, READONLY, OOM), a database connection a restart ended."""
    import redis.exceptions
    import sqlalchemy.exc

    from tessera.stores.db import is_unavailable as database_unavailable
    from tessera.stores.durability import is_write_refusal

    if isinstance(exc, unavailable_errors()):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        return is_write_refusal(exc)
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        return database_unavailable(exc)
    return False


async def _maybe_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    if is_unavailable(exc):
        return await _unavailable_handler(request, exc)
    return await _unhandled_handler(request, exc)


def unavailable_response() -> JSONResponse:
    return problem_response(503, "unavailable", "A backing service is unavailable; retry later.",
                            {"Retry-After": "1"})


def install_unavailable_handlers(app: FastAPI) -> None:
    import redis.exceptions
    import sqlalchemy.exc

    for exc_type in unavailable_errors():
        app.add_exception_handler(exc_type, _unavailable_handler)
    # MISCONF, READONLY, OOM replies; a connection a database restart terminated (it reaches
    # here as a plain DBAPIError): 503 when they mean that, else the last-resort 500.
    app.add_exception_handler(redis.exceptions.ResponseError, _maybe_unavailable_handler)
    app.add_exception_handler(sqlalchemy.exc.DBAPIError, _maybe_unavailable_handler)


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
