"""Request and response bodies (the HTTP shape; rules live in the service modules)."""

from __future__ import annotations

import email.message
import json
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
)
from starlette.requests import ClientDisconnect, Request

from tessera.errors import Problem
from tessera.security.passwords import normalise_password
from tessera.timeutil import rfc3339


def no_control_chars(value: str) -> str:
    """NUL and other C0 controls are refused in text (PostgreSQL cannot store NUL)."""
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in value) or "\x7f" in value:
        raise ValueError("must not contain control characters")
    return value


SafeStr = Annotated[str, AfterValidator(no_control_chars)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", str_max_length=4096)


class Closed(BaseModel):
    """A request body that takes no unknown field (422), strings at most 4096 characters."""

    model_config = ConfigDict(extra="forbid", str_max_length=4096)


Body = TypeVar("Body", bound=BaseModel)


def _invalid(errors: list[dict[str, Any]]) -> Problem:
    return Problem("validation_error", "The request is not valid.", extra={"errors": errors})


def _is_json(content_type: str) -> bool:
    if content_type == "application/json":  # what nearly every client sends
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


async def read_json(request: Request, model: type[Body]) -> Body:
    """A lean handler's JSON body, read and validated as FastAPI reads a route's body model,
    so every bad input gets the answer it gets on any other route: no body, 422 (`Field
    required`); a body that is not `application/json` (or `+json`), 422 (not an object);
    broken JSON, 422 (`JSON decode error` at its position); undecodable bytes, 400
    `malformed_body`; a body past the limit, 413 (the edge's receive raises)."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # FastAPI's answer to a body it could not read
        raise Problem("malformed_body", "The request body could not be parsed.") from None
    if not raw:
        raise _invalid([{"loc": ["body"], "msg": "Field required"}])
    value: Any = raw
    content_type = request.headers.get("content-type")
    if content_type and _is_json(content_type):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _invalid([{"loc": ["body", exc.pos], "msg": "JSON decode error"}]) from None
        except (ValueError, RecursionError):  # not UTF-8 (or -16/-32); nested past the limit
            raise Problem("malformed_body", "The request body could not be parsed.") from None
    try:
        return model.model_validate(value, from_attributes=True)  # as FastAPI validates
    except ValidationError as exc:
        raise _invalid([{"loc": ["body", *e["loc"]], "msg": str(e.get("msg", "invalid value"))}
                        for e in exc.errors()]) from None


class RegisterIn(Strict):
    email: EmailStr = Field(max_length=254)
    password: str = Field(json_schema_extra={"minLength": 8, "maxLength": 256})
    # Any JSON value: only the boolean `true` passes, checked by the route (422 `underage`).
    is_adult: Any = None
    policy_version: SafeStr | None = Field(default=None, max_length=64)

    @field_validator("password")
    @classmethod
    def _password(cls, value: str) -> str:
        return normalise_password(value)


class LoginJSON(Strict):
    email: SafeStr = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class UserOut(BaseModel):
    id: str
    email: str
    created_at: datetime

    @field_serializer("created_at")
    def _ts(self, v: datetime) -> str:
        return rfc3339(v)


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (a token type, not a secret)
    expires_in: int
    expires_at: str
    session_id: str
    # The X-CSRF-Token value for cookie-authenticated requests (also in the `csrf` cookie),
    # for frontends on a sibling host that cannot read tessera's host-only cookie.
    csrf_token: str


class SessionOut(BaseModel):
    id: str
    created_at: str
    expires_at: str
    user_agent: str | None
    current: bool



class SecondFactorIn(Closed):
    """A second factor, needed where one is enrolled: a TOTP or recovery code, or a passkey
    assertion (`challenge_id` from POST /auth/passkey/options, and `credential`)."""

    code: str | None = Field(default=None, max_length=64,
                             description="a TOTP code or a recovery code")
    challenge_id: str | None = Field(default=None, max_length=128)
    credential: dict[str, Any] | None = Field(
        default=None, description="a WebAuthn assertion (PublicKeyCredential JSON)")
