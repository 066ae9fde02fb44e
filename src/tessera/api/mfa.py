"""Second factors: /me/mfa (TOTP, recovery codes), /me/passkeys, and the logins they allow
(/auth/login/mfa, /auth/passkey/*). Rules live in domain/mfa.py."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope

from tessera.api.auth import NO_STORE, check_origin, logged_in, login_response
from tessera.api.deps import (
    CsrfKeyDep,
    CurrentUser,
    DbDep,
    HasherDep,
    LimiterDep,
    LoginsDep,
    MetricsDep,
    SecondFactorsDep,
    SettingsDep,
    principal_of,
)
from tessera.api.me import confirm_attempt, password_text
from tessera.api.schemas import Closed, SafeStr, SecondFactorIn, read_json
from tessera.config import Settings
from tessera.domain import accounts, mfa
from tessera.edge.privacy import forbid_tracking
from tessera.errors import Problem, problem_doc, problem_responses
from tessera.metrics import Metrics
from tessera.security.passwords import PasswordHasher
from tessera.stores.audit import AuditTrail
from tessera.stores.models import User
from tessera.stores.ratelimit import AttemptLimiter
from tessera.stores.sessions import AlreadyTaken

router = APIRouter(tags=["second factors"],
                   responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429, 503))

_CODE_DOC = ("`code`: a current TOTP code or an unused recovery code; instead, a passkey "
             "assertion: `challenge_id` (from POST /auth/passkey/options) and `credential`")


class PasswordAndFactorIn(SecondFactorIn):
    current_password: str = Field(max_length=1024)


class CodeIn(Closed):
    code: str = Field(min_length=1, max_length=64)


class PasskeyIn(Closed):
    challenge_id: str = Field(min_length=1, max_length=128)
    credential: dict[str, Any] = Field(description="the PublicKeyCredential JSON "
                                                   "(navigator.credentials.create)")
    name: SafeStr = Field(default="passkey", min_length=1, max_length=64)
    # A factor is a sensitive change: the current password and, where a factor is enrolled,
    # a second one (a code, or an assertion of an enrolled passkey). A session logged in at
    # most TESSERA_REAUTH_SECONDS ago gave both at its login and may leave them out.
    current_password: str | None = Field(default=None, max_length=1024)
    code: str | None = Field(default=None, max_length=64,
                             description="a TOTP code or a recovery code")
    assertion_challenge_id: str | None = Field(default=None, max_length=128)
    assertion: dict[str, Any] | None = Field(
        default=None, description="a WebAuthn assertion of an enrolled passkey")


class AssertionIn(Closed):
    challenge_id: str = Field(min_length=1, max_length=128)
    credential: dict[str, Any] = Field(description="the PublicKeyCredential JSON "
                                                   "(navigator.credentials.get)")


class MfaLoginIn(SecondFactorIn):
    mfa_token: str = Field(min_length=1, max_length=128)


class EmptyIn(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _json(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=NO_STORE)


async def _check_password(settings: Settings, limiter: AttemptLimiter, hasher: PasswordHasher,
                          user: User, password: str, request: Request) -> None:
    await confirm_attempt(settings, limiter, user, request)
    if not await accounts.verify_password(hasher, user, password_text(password)):
        raise Problem("wrong_password", "The current password is wrong.")
    await limiter.forgive("password-confirm", user.id, all_of_them=True)


def _recent_login(settings: Settings, request: Request) -> bool:
    """The session's login is at most TESSERA_REAUTH_SECONDS old (its `auth_time`), or 403
    `reauthentication_required`. True if that login used two factors (`amr` has `mfa`)."""
    principal = principal_of(request)
    claims = principal.claims if principal is not None else {}
    auth_time = claims.get("auth_time", claims.get("iat"))
    if not isinstance(auth_time, int) or time.time() - auth_time > settings.reauth_seconds:
        raise Problem("reauthentication_required",
                      "This session's login is too old for this change: send "
                      "`current_password` (and a second factor where one is enrolled).")
    amr = claims.get("amr")
    return isinstance(amr, list) and "mfa" in amr


async def _check_factor(db: DbDep, factors: mfa.SecondFactors, user: User,
                        body: SecondFactorIn) -> None:
    await mfa.require_second_factor(db, factors, user, code=body.code,
                                    challenge_id=body.challenge_id, credential=body.credential)


# --- /me/mfa ------------------------------------------------------------------------------

@router.get("/me/mfa")
async def get_mfa(user: CurrentUser, db: DbDep) -> JSONResponse:
    """What is enrolled: `{totp, passkeys: [{id, name, created_at, last_used_at}],
    recovery_codes_left}`."""
    return _json(await mfa.mfa_view(db, user.id))


@router.post("/me/mfa/totp", status_code=201, responses=problem_doc({
    401: "mfa_required / invalid_code: a passkey is enrolled, so " + _CODE_DOC,
    403: "invalid_credentials", 409: "totp_already_enabled"}))
async def start_totp(request: Request, body: PasswordAndFactorIn, user: CurrentUser, db: DbDep,
                     settings: SettingsDep, limiter: LimiterDep, hasher: HasherDep,
                     factors: SecondFactorsDep) -> JSONResponse:
    """Enrol an authenticator app: `{secret, otpauth_uri}` (RFC 6238: SHA-1, 6 digits, 30 s).
    Not active until confirmed with a first code."""
    await _check_password(settings, limiter, hasher, user, body.current_password, request)
    if (await mfa.enrolled(db, user.id)).totp:
        raise Problem("totp_already_enabled",
                      "TOTP is already active; disable it first to enrol a new authenticator.")
    await _check_factor(db, factors, user, body)
    enrolment = await mfa.start_totp(db, factors, user)
    await accounts.audit(db, "totp_enrolment_started", user_id=user.id)
    return _json(enrolment, 201)


@router.post("/me/mfa/totp/confirm", responses=problem_doc({
    400: "invalid_code", 409: "no_pending_totp", 429: "too_many_attempts"}))
async def confirm_totp(body: CodeIn, user: CurrentUser, db: DbDep,
                       factors: SecondFactorsDep) -> JSONResponse:
    """Activate TOTP with its first code: `{recovery_codes: [10 strings]}`, shown only now."""
    codes = await mfa.confirm_totp(db, factors, user, body.code)
    await accounts.audit(db, "totp_enabled", user_id=user.id)
    return _json({"recovery_codes": codes})


@router.delete("/me/mfa/totp", status_code=204, response_class=Response,
               responses=problem_doc({401: "mfa_required or invalid_code: " + _CODE_DOC,
                                      403: "invalid_credentials", 404: "not_found"}))
async def disable_totp(request: Request, body: PasswordAndFactorIn, user: CurrentUser, db: DbDep,
                       settings: SettingsDep, limiter: LimiterDep, hasher: HasherDep,
                       factors: SecondFactorsDep) -> Response:
    """Remove the authenticator app (and the recovery codes): password and a code."""
    await _check_password(settings, limiter, hasher, user, body.current_password, request)
    if not (await mfa.enrolled(db, user.id)).totp:
        raise Problem("not_found", "TOTP is not enabled.")
    await _check_factor(db, factors, user, body)
    await mfa.disable_totp(db, factors, user.id)
    await accounts.audit(db, "totp_disabled", user_id=user.id)
    return Response(status_code=204, headers=NO_STORE)


@router.post("/me/mfa/recovery-codes", responses=problem_doc({
    401: "mfa_required or invalid_code: " + _CODE_DOC, 403: "invalid_credentials",
    409: "mfa_not_enabled"}))
async def new_recovery_codes(request: Request, body: PasswordAndFactorIn, user: CurrentUser,
                             db: DbDep, settings: SettingsDep, limiter: LimiterDep,
                             hasher: HasherDep, factors: SecondFactorsDep) -> JSONResponse:
    """A new set of 10 recovery codes; the old set stops working."""
    await _check_password(settings, limiter, hasher, user, body.current_password, request)
    if not (await mfa.enrolled(db, user.id)).any:
        raise Problem("mfa_not_enabled", "Enrol TOTP or a passkey first.")
    await _check_factor(db, factors, user, body)
    codes = await mfa.regenerate_recovery_codes(db, factors, user)
    await accounts.audit(db, "recovery_codes_regenerated", user_id=user.id)
    return _json({"recovery_codes": codes})


# --- /me/passkeys -------------------------------------------------------------------------

@router.post("/me/passkeys/options")
async def passkey_creation_options(user: CurrentUser, db: DbDep,
                                   factors: SecondFactorsDep) -> JSONResponse:
    """`PublicKeyCredentialCreationOptions` (JSON, base64url) for
    `navigator.credentials.create`, with the `challenge_id` to send back. The challenge is
    single use and expires after TESSERA_WEBAUTHN_CHALLENGE_TTL_SECONDS."""
    return _json(await mfa.registration_options(db, factors, user))


@router.post("/me/passkeys", status_code=201, responses=problem_doc({
    400: "invalid_credential",
    403: "invalid_credentials, or reauthentication_required: a session logged in more than "
         "TESSERA_REAUTH_SECONDS ago sends `current_password`",
    401: "mfa_required or invalid_code, where a factor is enrolled: `code`, or "
         "`assertion_challenge_id` + `assertion`"}))
async def add_passkey(request: Request, body: PasskeyIn, user: CurrentUser, db: DbDep,
                      settings: SettingsDep, limiter: LimiterDep, hasher: HasherDep,
                      factors: SecondFactorsDep) -> JSONResponse:
    """Needs the current password and, where a factor is enrolled, a second factor: a
    stolen session alone must not add a factor (it would pass for two factors later). A
    session whose login is recent (TESSERA_REAUTH_SECONDS) proved them at that login."""
    if body.current_password is None:
        proved_factor = _recent_login(settings, request)
    else:
        await _check_password(settings, limiter, hasher, user, body.current_password, request)
        proved_factor = False
    if not proved_factor or body.code is not None or body.assertion is not None:
        await mfa.require_second_factor(db, factors, user, code=body.code,
                                        challenge_id=body.assertion_challenge_id,
                                        credential=body.assertion)
    key = await mfa.register_passkey(db, factors, user, body.challenge_id, body.credential,
                                     body.name)
    await accounts.audit(db, "passkey_added", user_id=user.id)
    view = mfa.passkey_view(key)
    return _json({"id": view["id"], "name": view["name"], "created_at": view["created_at"]}, 201)


@router.delete("/me/passkeys/{passkey_id}", status_code=204, response_class=Response,
               responses=problem_doc({401: "mfa_required or invalid_code: " + _CODE_DOC,
                                      403: "invalid_credentials", 404: "not_found"}))
async def remove_passkey(request: Request, passkey_id: Annotated[str, Path(max_length=64)],
                         body: PasswordAndFactorIn, user: CurrentUser, db: DbDep,
                         settings: SettingsDep, limiter: LimiterDep, hasher: HasherDep,
                         factors: SecondFactorsDep) -> Response:
    """Needs the password and, as every factor change, a second factor (a code, or an
    assertion, which may come from this very passkey)."""
    await _check_password(settings, limiter, hasher, user, body.current_password, request)
    if not any(k["id"] == passkey_id for k in (await mfa.mfa_view(db, user.id))["passkeys"]):
        raise Problem("not_found", "No such passkey of yours.")
    await _check_factor(db, factors, user, body)
    if not await mfa.delete_passkey(db, user.id, passkey_id):
        raise Problem("not_found", "No such passkey of yours.")
    await accounts.audit(db, "passkey_removed", user_id=user.id)
    return Response(status_code=204, headers=NO_STORE)


# --- logins -------------------------------------------------------------------------------

LOGIN_MFA_PATH = "/auth/login/mfa"


async def login_mfa(scope: Scope, receive: Receive, *, settings: Settings,
                    db_factory: async_sessionmaker[AsyncSession], factors: mfa.SecondFactors,
                    metrics: Metrics, logins: accounts.Logins, csrf_key: bytes,
                    audit_trail: AuditTrail) -> ASGIApp:
    """POST /auth/login/mfa, the second login step (a lean handler: api/lean.py dispatches
    it, `LOGIN_MFA_OPENAPI` declares it): the `mfa_token` from the 401 `mfa_required` of
    POST /auth/login, and a TOTP code or a recovery code as `code`, or a passkey assertion
    as `challenge_id` + `credential`. Answers as login does (body and cookies). At most 5
    wrong tries per mfa_token and 10 per account in the login window."""
    request = Request(scope, receive)
    body = await read_json(request, MfaLoginIn)  # first, as FastAPI reads a route's body
    check_origin(request, settings)
    code = mfa.totp_shaped(body.code) if body.credential is None else None
    if code is not None:
        # The common case, a TOTP code after a password: one Redis script checks the code
        # against what the first step kept, takes the time step and writes the session,
        # while nothing about the user changed since the first step; no database work.
        fast = await mfa.finish_with_totp(factors, logins, body.mfa_token, code,
                                          request.headers.get("user-agent"))
        if fast is None:
            raise mfa.invalid_mfa_token()
        if fast.restricted:
            forbid_tracking(scope)  # whatever the answer
        if fast.issued is not None:
            # Buffered (stores/audit.py): the step does no database work at all.
            accounts.audit_later(audit_trail, "login_mfa", user_id=fast.user_id,
                                 outcome="ok")
            return logged_in(settings, metrics, csrf_key, fast.issued)
        if fast.pending is None:  # a wrong code, or a replay
            async with db_factory() as db:
                await accounts.audit(db, "login_mfa", user_id=fast.user_id,
                                     outcome="failed")
            raise mfa.invalid_code()
        step = fast.pending  # the user or the factor changed since: the full check decides
    else:
        # One Redis round trip before the factor is checked (the token read, the attempt
        # counted) and one after (the session written, the token taken, the counter
        # cleared: one script).
        begun = await mfa.begin_second_step(factors, body.mfa_token)
        if begun is None:
            raise mfa.invalid_mfa_token()
        step = begun
    user_id = step.user_id
    async with db_factory() as db:
        user, totp = await mfa.login_state(db, user_id)
        if user is None or mfa.password_fingerprint(user) != step.password:
            raise mfa.invalid_mfa_token()  # the password changed (or the account went)
        if user.restrict_processing or user.object_to_processing:
            forbid_tracking(scope)  # whatever the answer
        if body.credential is not None:
            if "hwk" in step.amr:  # the first step was a passkey: the second must differ
                raise mfa.invalid_code()
            assertion = await mfa.check_assertion(db, factors, body.challenge_id,
                                                  body.credential, user_id=user_id)
            earned = assertion.amr if assertion else None
        elif body.code:
            earned = await mfa.check_code_with(db, factors, user_id, body.code, totp)
        else:
            raise Problem("validation_error", "Send `code` or `challenge_id` + `credential`.",
                          extra={"errors": [{"loc": ["body", "code"],
                                             "msg": "Field required"}]})
        if earned is None:
            await accounts.audit(db, "login_mfa", user_id=user_id, outcome="failed")
            raise mfa.invalid_code()
        return await _second_step_done(request, db, settings, metrics, logins, csrf_key,
                                       audit_trail, user, step, earned)


# The lean handler's OpenAPI operation (api/lean.py merges it into the schema).
LOGIN_MFA_OPENAPI: dict[str, dict[str, Any]] = {LOGIN_MFA_PATH: {"post": {
    "tags": ["second factors", "auth"], "summary": "Login Mfa",
    # as FastAPI named it while this was a route: generated clients keep their method name
    "operationId": "login_mfa_auth_login_mfa_post",
    "description": " ".join((login_mfa.__doc__ or "").split()),
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": MfaLoginIn.model_json_schema()}}},
    "responses": {
        "200": {"description": "logged in: the token (and the `session` and `csrf` cookies), "
                               "as POST /auth/login answers",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/"
                                                                    "TokenOut"}}}},
        **{str(status): doc for status, doc in {
            **problem_responses(400, 413, 422, 503),
            **problem_doc({
                401: "invalid_code (wrong, replayed or used code or assertion); "
                     "invalid_token (the mfa_token is unknown, used or expired)",
                403: "account_inactive, or csrf_failed (a browser's request from an origin "
                     "not allowed)",
                429: "too_many_attempts"})}.items()}}}}}


async def _second_step_done(request: Request, db: AsyncSession, settings: Settings,
                            metrics: Metrics, logins: accounts.Logins, csrf_key: bytes,
                            audit_trail: AuditTrail, user: User,
                            step: mfa.SecondStep,
                            earned: list[str]) -> JSONResponse:
    """The second factor was right: the session, if the account is active and the epoch
    read at the first step still holds."""
    if user.restrict_processing or user.object_to_processing:
        forbid_tracking(request.scope)  # whatever the answer
    if not user.is_active:
        raise Problem("account_inactive", "This account is deactivated.")
    try:
        response = await login_response(request, db, settings, metrics, logins, csrf_key, user,
                                        mfa.full_amr(step.amr, earned), epoch=step.epoch,
                                        take=step.take, forget=step.forget)
    except AlreadyTaken:
        raise mfa.invalid_mfa_token() from None  # used meanwhile by a concurrent request
    # Buffered (stores/audit.py): the step's one commit is the replay guard's.
    accounts.audit_later(audit_trail, "login_mfa", user_id=user.id, outcome="ok")
    return response


@router.post("/auth/passkey/options", tags=["auth"])
async def passkey_request_options(request: Request, factors: SecondFactorsDep,
                                  body: EmptyIn | None = None) -> JSONResponse:
    """`PublicKeyCredentialRequestOptions` for a discoverable passkey (no
    allowCredentials), with a single-use `challenge_id`. Also the challenge for a passkey
    as second factor (POST /auth/login/mfa, sensitive changes)."""
    return _json(await mfa.authentication_options(factors))


@router.post("/auth/passkey/login", tags=["auth"], responses=problem_doc({
    401: "invalid_credentials; or mfa_required when the authenticator did not verify the "
         "user and the account also has TOTP", 403: "account_inactive"}))
async def passkey_login(body: AssertionIn, request: Request, db: DbDep, settings: SettingsDep,
                        factors: SecondFactorsDep, metrics: MetricsDep, logins: LoginsDep,
                        csrf_key: CsrfKeyDep) -> JSONResponse:
    """Log in with a passkey alone. With user verification (PIN, biometrics) it counts as
    two factors: `amr` ["hwk", "user", "mfa"]. Answers as login does."""
    check_origin(request, settings)
    assertion = await mfa.check_assertion(db, factors, body.challenge_id, body.credential)
    if assertion is None:
        await accounts.audit(db, "login_passkey", outcome="failed")
        raise accounts.invalid_credentials()
    user = await db.get(User, assertion.user_id)
    if user is None:
        raise accounts.invalid_credentials()
    if user.restrict_processing or user.object_to_processing:
        forbid_tracking(request.scope)  # whatever the answer
    if not user.is_active:
        raise Problem("account_inactive", "This account is deactivated.")
    await accounts.audit(db, "login_passkey", user_id=user.id, outcome="ok")
    amr = mfa.full_amr(assertion.amr)
    if "mfa" not in amr:
        enrolled = await mfa.enrolled(db, user.id)
        if enrolled.totp:  # one factor here; the account asks for two: a code next
            raise (await mfa.mfa_required(factors, user, amr, enrolled,
                                          other_than="passkey",
                                          epoch=await logins.epoch(user.id))
                   or await accounts.superseded_login(db, user.id))
    return await login_response(request, db, settings, metrics, logins, csrf_key, user, amr)
