"""/auth: register, login, logout, sessions (introspection: api/lean.py; the revocation feed:
api/revocations.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, EmailStr, Field, ValidationError, field_validator
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.responses import JSONResponse

from tessera.api.cookies import clear_login_cookies, set_login_cookies
from tessera.api.deps import (
    AuditTrailDep,
    CsrfKeyDep,
    CurrentSession,
    CurrentUser,
    DbDep,
    DbFactoryDep,
    HasherDep,
    LimiterDep,
    LoginsDep,
    MailWorkerDep,
    MetricsDep,
    OptionalSession,
    PolicyDep,
    ProfilesDep,
    SecondFactorsDep,
    SessionsDep,
    SettingsDep,
)
from tessera.api.schemas import (
    Closed,
    LoginJSON,
    RegisterIn,
    SessionOut,
    TokenOut,
    UserOut,
)
from tessera.config import Settings
from tessera.domain import accounts, mail, mfa, recovery
from tessera.domain.accounts import Logins
from tessera.domain.auth import csrf_token_for
from tessera.edge.privacy import forbid_tracking
from tessera.errors import Problem, problem_doc, problem_responses
from tessera.metrics import Metrics
from tessera.security.passwords import normalise_password
from tessera.security.tokens import IssuedToken
from tessera.stores.models import User
from tessera.stores.ratelimit import AttemptLimiter, ip_bucket
from tessera.timeutil import from_epoch

log = logging.getLogger("tessera.auth")

router = APIRouter(
    prefix="/auth", tags=["auth"],
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429, 503),
)

NO_STORE = {"Cache-Control": "no-store"}


def check_origin(request: Request, settings: Settings) -> None:
    """Login CSRF: a browser page on a foreign site must not log its visitor in (or register
    them) as someone else. Pages on tessera's own origin or on a CORS-allowed one may."""
    origin = request.headers.get("origin")
    cross_site = request.headers.get("sec-fetch-site") == "cross-site"
    if origin is None and not cross_site:
        return  # not a browser, or a same-origin navigation
    if origin is not None and origin in settings.cors_origins:
        return
    if origin is not None and not cross_site:
        host = request.headers.get("host", "")
        if origin.split("://", 1)[-1] == host:
            return
    raise Problem("csrf_failed", "Cross-site login and registration are refused.")


def client_key(request: Request) -> str:
    """What per-IP limits count this request under (IPv6: its /64)."""
    client = request.scope.get("client")
    return ip_bucket(client[0]) if client else "unknown"


@router.post("/register", status_code=201, response_model=UserOut,
             responses=problem_doc({409: "email_taken or policy_outdated",
                                    422: "underage or validation_error"}))
async def register(body: RegisterIn, request: Request, response: Response, db: DbDep,
                   settings: SettingsDep, policies: PolicyDep, limiter: LimiterDep,
                   hasher: HasherDep, mail_worker: MailWorkerDep) -> UserOut:
    if body.is_adult is not True:
        raise Problem("underage", "tessera accepts no users under 18: is_adult must be true.",
                      extra={"errors": [{"loc": ["body", "is_adult"], "msg": "must be true"}]})
    policy = await policies.get()
    if body.policy_version is not None and body.policy_version != policy.current.version:
        raise Problem("policy_outdated", "That is not the current policy version.",
                      extra={"current_version": policy.current.version})
    s = settings
    check_origin(request, settings)
    await limiter.attempt([("register-ip", client_key(request), s.register_max_per_ip)],
                          s.register_window_seconds)
    user = await accounts.register_user(
        db, hasher, email=str(body.email), password=body.password, policy=policy,
        accepted_policy=body.policy_version is not None,
        on_create=lambda db, user: mail.queue_verification(db, settings, user))
    mail_worker.wake()
    await accounts.audit(db, "register", user_id=user.id, outcome="ok")
    response.headers.update(NO_STORE)
    assert user.email is not None
    return UserOut(id=user.id, email=user.email, created_at=user.created_at)


_LOGIN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["email", "password"],
                "properties": {"email": {"type": "string", "format": "email"},
                               "password": {"type": "string", "format": "password"}}}},
            "application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["username", "password"],
                "properties": {"username": {"type": "string", "description": "the email"},
                               "password": {"type": "string", "format": "password"},
                               "grant_type": {"type": "string"},
                               "scope": {"type": "string"}}}},
        },
    }
}


async def _read_credentials(request: Request) -> tuple[str, str]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            raw: Any = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise Problem("malformed_body", "The body is not valid JSON.") from None
        if not isinstance(raw, dict):
            raise Problem("validation_error", "The body must be a JSON object.",
                          extra={"errors": [{"loc": ["body"], "msg": "must be an object"}]})
        try:
            creds = LoginJSON.model_validate(raw)
        except ValidationError as exc:
            errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]
            raise Problem("validation_error", "The request is not valid.",
                          extra={"errors": errors}) from None
        return creds.email, creds.password
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        username, password = form.get("username"), form.get("password")
        errors = [{"loc": ["body", name], "msg": "Field required"}
                  for name, value in (("username", username), ("password", password))
                  if not isinstance(value, str) or not value]
        if errors:
            raise Problem("validation_error", "The request is not valid.",
                          extra={"errors": errors})
        assert isinstance(username, str) and isinstance(password, str)
        if len(username) > 320 or len(password) > 1024 or "\x00" in username:
            raise Problem("validation_error", "The request is not valid.",
                          extra={"errors": [{"loc": ["body"], "msg": "value too long"}]})
        return username, password
    raise Problem("unsupported_media_type",
                  "Send JSON {email, password} or the OAuth2 password form.")


@router.post("/login", response_model=TokenOut, openapi_extra=_LOGIN_BODY,
             responses=problem_doc({401: "invalid_credentials, or mfa_required (with "
                                         "`mfa_token` and `methods`: finish with POST "
                                         "/auth/login/mfa) when a second factor is enrolled",
                                    403: "account_inactive or email_not_verified",
                                    429: "too_many_attempts"}))
async def login(request: Request, db: DbDep, settings: SettingsDep, limiter: LimiterDep,
                sessions: SessionsDep, hasher: HasherDep, metrics: MetricsDep,
                logins: LoginsDep, csrf_key: CsrfKeyDep,
                factors: SecondFactorsDep) -> JSONResponse:
    check_origin(request, settings)
    email, password = await _read_credentials(request)
    s = settings
    account, ip = accounts.email_key(email), client_key(request)
    await limiter.attempt([("login-account", account, s.login_max_failures_per_account),
                           ("login-ip", ip, s.login_max_failures_per_ip),
                           *accounts.password_work_limits(s, account, ip)],
                          s.login_failure_window_seconds)
    try:
        try:
            password = normalise_password(password, new=False)
        except ValueError:
            password = ""  # can match no stored hash; still costs one hash below
        user, epoch, generation = await accounts.authenticate(db, sessions, hasher, email,
                                                              password)
    except Problem as problem:
        metrics.logins.labels("inactive" if problem.code == "account_inactive"
                              else "failed").inc()
        raise
    if user.restrict_processing or user.object_to_processing:
        forbid_tracking(request.scope)
    # Only failures count: a success clears the account and takes back this IP attempt.
    await limiter.forgive_success(account=("login-account", account), ip=("login-ip", ip))
    if s.require_verified_email and not user.email_verified:  # the password was right
        metrics.logins.labels("unverified").inc()
        raise Problem("email_not_verified", "Confirm your email address first "
                      "(POST /auth/verify-email/resend sends a new link).")
    enrolled = await mfa.enrolled(db, user.id)
    if enrolled.any:  # the password was right; the second step needs the mfa_token
        metrics.logins.labels("mfa_required").inc()
        raise (await mfa.mfa_required(factors, user, ["pwd"], enrolled, epoch=epoch,
                                      generation=generation)
               or await accounts.superseded_login(db, user.id))
    return await login_response(request, db, settings, metrics, logins, csrf_key, user, ["pwd"],
                                epoch=epoch)


async def login_response(request: Request, db: AsyncSession, settings: Settings,
                         metrics: Metrics, logins: Logins, csrf_key: bytes, user: User,
                         amr: list[str], *, epoch: str | None = None, take: str | None = None,
                         forget: Sequence[str] = ()) -> JSONResponse:
    """The one way a login ends (password, second step, passkey): a session, its token in
    the body, and the `session` and `csrf` cookies. `epoch`: the user's auth epoch as read
    before the credentials were checked (read now when the caller had none). `take`,
    `forget`: see `accounts.Logins.open` (a second step's mfa_token and counter)."""
    if user.restrict_processing or user.object_to_processing:
        forbid_tracking(request.scope)
    if epoch is None:
        epoch = await logins.epoch(user.id)
    issued = await logins.open(user, request.headers.get("user-agent"), epoch=epoch, amr=amr,
                               take=take, forget=forget)
    if issued is None:  # the password changed or the account ended while this one ran
        metrics.logins.labels("failed").inc()
        raise await accounts.superseded_login(db, user.id)
    return logged_in(settings, metrics, csrf_key, issued)


def logged_in(settings: Settings, metrics: Metrics, csrf_key: bytes,
              issued: IssuedToken) -> JSONResponse:
    """How every login answers once its session is written (`login_response`, and the TOTP
    second step's one script): the token in the body, the `session` and `csrf` cookies."""
    metrics.logins.labels("ok").inc()
    csrf = csrf_token_for(csrf_key, issued.sid)
    body = TokenOut(access_token=issued.token, expires_in=issued.exp - issued.iat,
                    expires_at=from_epoch(issued.exp), session_id=issued.sid, csrf_token=csrf)
    response = JSONResponse(body.model_dump(), headers=NO_STORE)
    set_login_cookies(response, settings, issued, csrf)
    return response


# --- email verification and password reset (docs/mail.md) --------------------------------

class AddressIn(Closed):
    email: EmailStr = Field(max_length=254)


class TokenIn(Closed):
    token: str = Field(min_length=1, max_length=512)


class ResetConfirmIn(TokenIn):
    new_password: str = Field(json_schema_extra={"minLength": 8, "maxLength": 256})
    # The second factor's code, for an account that has one (issue 14).
    code: str | None = Field(default=None, max_length=64)

    @field_validator("new_password")
    @classmethod
    def _new(cls, value: str) -> str:
        return normalise_password(value)


class AcceptedOut(BaseModel):
    status: str = "accepted"
    detail: str


_ACCEPTED = AcceptedOut(detail="If this address belongs to an account that can use it, a "
                               "mail is on its way.").model_dump()


async def _mail_attempt(settings: Settings, limiter: AttemptLimiter, request: Request,
                        kind: str, email: str) -> None:
    s = settings
    await limiter.attempt([(f"{kind}-address", accounts.email_key(email),
                            s.mail_max_per_address),
                           (f"{kind}-ip", client_key(request), s.mail_max_per_ip)],
                          s.mail_limit_window_seconds)


def _accepted() -> JSONResponse:
    return JSONResponse(_ACCEPTED, status_code=202, headers=NO_STORE)


@router.post("/verify-email", status_code=204, response_class=Response,
             responses=problem_doc({400: "invalid_token"}))
async def verify_email(body: TokenIn, db: DbDep, profiles: ProfilesDep) -> Response:
    """Confirm the address with the token from the verification mail."""
    await recovery.verify_email(db, profiles, body.token)
    return Response(status_code=204, headers=NO_STORE)


@router.post("/verify-email/resend", status_code=202, response_model=AcceptedOut,
             responses=problem_doc({429: "too_many_attempts"}))
async def resend_verification(body: AddressIn, request: Request, settings: SettingsDep,
                              limiter: LimiterDep, db_factory: DbFactoryDep,
                              mail_worker: MailWorkerDep) -> JSONResponse:
    """202 whatever the address: a new mail only for an active, unverified account. The
    lookup runs apart from the request, so no timing says anything about the address."""
    email = str(body.email)
    await _mail_attempt(settings, limiter, request, "verify-resend", email)
    mail_worker.detach(_quietly(partial(recovery.resend_verification, db_factory, settings,
                                        mail_worker, email)))
    return _accepted()


@router.post("/password-reset", status_code=202, response_model=AcceptedOut,
             responses=problem_doc({429: "too_many_attempts"}))
async def password_reset(body: AddressIn, request: Request, settings: SettingsDep,
                         limiter: LimiterDep, db_factory: DbFactoryDep,
                         mail_worker: MailWorkerDep) -> JSONResponse:
    """202, the same body and time for any address (no hashing either way): a known active
    account gets a mail with a single-use link, the lookup and the mail done apart from the
    request."""
    email = str(body.email)
    await _mail_attempt(settings, limiter, request, "reset", email)
    mail_worker.detach(_quietly(partial(recovery.request_reset, db_factory, settings,
                                        mail_worker, email)))
    return _accepted()


@router.post("/password-reset/confirm", status_code=204, response_class=Response,
             responses=problem_doc({400: "invalid_token", 401: "mfa_required",
                                    422: "validation_error"}))
async def password_reset_confirm(body: ResetConfirmIn, db: DbDep, settings: SettingsDep,
                                 hasher: HasherDep, mail_worker: MailWorkerDep,
                                 profiles: ProfilesDep, logins: LoginsDep,
                                 factors: SecondFactorsDep) -> Response:
    """The new password; every session of the user ends; not logged in."""
    await recovery.confirm_reset(db, settings, hasher, mail_worker, profiles, logins, factors,
                                 body.token, body.new_password, body.code)
    return Response(status_code=204, headers=NO_STORE)


async def _quietly(work: Callable[[], Awaitable[None]]) -> None:
    """Background work after a 202: a failure is logged by type only (no address)."""
    try:
        await work()
    except Exception as exc:
        log.warning("mail request failed after the answer (%s)", type(exc).__name__)


@router.post("/logout", status_code=204, response_class=Response)
async def logout(principal: OptionalSession, logins: LoginsDep, audit_trail: AuditTrailDep,
                 settings: SettingsDep) -> Response:
    response = Response(status_code=204, headers=NO_STORE)
    if principal is not None:
        await logins.revoke(principal.user_id, principal.sid, "logout")
        accounts.audit_later(audit_trail, "logout", user_id=principal.user_id, webhook=(
            "session.revoked", {"user_id": principal.user_id, "session_id": principal.sid}))
    clear_login_cookies(response, settings)
    return response


@router.post("/logout-all", status_code=204, response_class=Response)
async def logout_all(principal: CurrentSession, logins: LoginsDep, audit_trail: AuditTrailDep,
                     settings: SettingsDep) -> Response:
    await logins.revoke_all(principal.user_id, "logout_all")
    # session_id null: every session of the user.
    accounts.audit_later(audit_trail, "logout_all", user_id=principal.user_id, webhook=(
        "session.revoked", {"user_id": principal.user_id, "session_id": None}))
    response = Response(status_code=204, headers=NO_STORE)
    clear_login_cookies(response, settings)
    return response


@router.get("/csrf")
async def csrf_token(principal: CurrentSession, csrf_key: CsrfKeyDep) -> JSONResponse:
    """The current session's X-CSRF-Token, e.g. for a page reloaded on another host."""
    return JSONResponse({"csrf_token": csrf_token_for(csrf_key, principal.sid)},
                        headers=NO_STORE)


@router.get("/sessions", response_model=list[SessionOut])
async def list_sessions(user: CurrentUser, principal: CurrentSession, response: Response,
                        sessions: SessionsDep) -> list[SessionOut]:
    response.headers.update(NO_STORE)
    return [SessionOut(id=r.sid, created_at=from_epoch(r.created_at),
                       expires_at=from_epoch(r.expires_at), user_agent=r.user_agent,
                       current=r.sid == principal.sid)
            for r in await sessions.list(user.id)]


@router.delete("/sessions/{session_id}", status_code=204, response_class=Response)
async def delete_session(session_id: str, user: CurrentUser, logins: LoginsDep) -> Response:
    if len(session_id) > 64 or not await logins.revoke(user.id, session_id, "ended_by_user"):
        raise Problem("not_found", "No such session of yours.")
    return Response(status_code=204, headers=NO_STORE)
