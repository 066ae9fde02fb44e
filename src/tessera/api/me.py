"""/me: the logged-in user's own account and rights (P5, P6, P8, P10)."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Path, Request, Response
from pydantic import EmailStr, Field, StrictBool, field_validator
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.responses import JSONResponse

from tessera.api.auth import client_key
from tessera.api.cookies import clear_login_cookies
from tessera.api.deps import (
    AuditTrailDep,
    CurrentSession,
    CurrentUser,
    CurrentUserAnyPolicy,
    DbDep,
    ErasureDep,
    HasherDep,
    LimiterDep,
    LoginsDep,
    MailWorkerDep,
    PolicyDep,
    ProfilesDep,
    SecondFactorsDep,
    SessionsDep,
    SettingsDep,
    UsageDep,
)
from tessera.api.schemas import Closed, SafeStr, SecondFactorIn
from tessera.config import Settings
from tessera.domain import accounts, consents, events, mfa, privacy_requests, recovery
from tessera.domain.profiles import account_view
from tessera.edge.privacy import attribute_usage
from tessera.errors import Problem, problem_doc, problem_responses
from tessera.security.passwords import normalise_password
from tessera.stores.mail import mails_of
from tessera.stores.models import AuditEvent, PrivacyRequest, User
from tessera.stores.ratelimit import AttemptLimiter
from tessera.stores.usage import usage_log_of
from tessera.timeutil import from_epoch, rfc3339

log = logging.getLogger("tessera.me")

router = APIRouter(
    prefix="/me", tags=["me"],
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
)

NO_STORE = {"Cache-Control": "no-store"}


class EmailChangeIn(SecondFactorIn):
    email: EmailStr = Field(max_length=254)
    current_password: str = Field(max_length=1024)


class EmailTokenIn(Closed):
    token: str = Field(min_length=1, max_length=512)


class PasswordChangeIn(SecondFactorIn):
    current_password: str = Field(max_length=1024)
    new_password: str = Field(json_schema_extra={"minLength": 8, "maxLength": 256})

    @field_validator("new_password")
    @classmethod
    def _new(cls, value: str) -> str:
        return normalise_password(value)


class PasswordConfirmIn(SecondFactorIn):
    password: str = Field(max_length=1024)


class ConsentIn(Closed):
    granted: StrictBool


class RestrictionsIn(Closed):
    restrict_processing: StrictBool
    object_to_processing: StrictBool


class PolicyConsentIn(Closed):
    version: SafeStr = Field(min_length=1, max_length=64)


class PrivacyRequestIn(Closed):
    kind: Literal["confirm", "access", "rectify", "delete", "restrict", "portability", "object",
                  "withdraw_consent"]
    region: str = Field(max_length=8, pattern=r"^[A-Za-z]{2}$")
    message: SafeStr | None = Field(default=None, max_length=2000)

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        return privacy_requests.normalise_region(value)


async def confirm_attempt(settings: Settings, limiter: AttemptLimiter, user: User,
                          request: Request) -> None:
    """A stolen token must not buy unlimited password guesses: confirmations are limited
    like logins, and count as password work like them (whatever the outcome)."""
    s = settings
    await limiter.attempt(
        [("password-confirm", user.id, s.login_max_failures_per_account),
         *accounts.password_work_limits(s, accounts.account_of(user), client_key(request))],
        s.login_failure_window_seconds)


def password_text(raw: str) -> str:
    try:
        return normalise_password(raw, new=False)
    except ValueError:
        return ""  # cannot match any stored hash


def restrictions_view(user: User) -> dict[str, bool]:
    return {"restrict_processing": user.restrict_processing,
            "object_to_processing": user.object_to_processing}


async def fresh_view(db: AsyncSession, user: User) -> dict[str, Any]:
    """After a change: the account as the database now holds it."""
    return account_view(user, await consents.current_consents(db, user.id))


def privacy_request_view(row: PrivacyRequest) -> dict[str, Any]:
    return {"id": row.id, "kind": row.kind, "region": row.region, "message": row.message,
            "status": row.status, "created_at": rfc3339(row.created_at),
            "due_at": rfc3339(row.due_at),
            "resolved_at": rfc3339(row.resolved_at) if row.resolved_at else None,
            "resolution": row.resolution}


_FACTOR_DOC = ("mfa_required (a second factor is enrolled and none came: send `code`, a TOTP "
               "or recovery code, or a passkey assertion as `challenge_id` + `credential`) "
               "or invalid_code")


@router.patch("", status_code=202,
              responses={200: {"description": "the same address as now: nothing changes"},
                         **problem_doc({401: _FACTOR_DOC, 403: "invalid_credentials",
                                        409: "email_taken", 429: "too_many_attempts"})})
async def update_me(request: Request, body: EmailChangeIn, user: CurrentUser, db: DbDep,
                    settings: SettingsDep, limiter: LimiterDep, hasher: HasherDep,
                    mail_worker: MailWorkerDep, profiles: ProfilesDep,
                    factors: SecondFactorsDep) -> JSONResponse:
    """Ask to change the email: 202 with `pending_email`, a confirmation mail to the new
    address (POST /me/email/confirm) and a notice to the old one; the email changes only
    once the new address is confirmed. Needs the current password and, where a factor is
    enrolled, a second factor."""
    s = settings  # 409 email_taken tells whether an address has an account: limit it
    await limiter.attempt([("email-change", user.id, s.email_change_max_per_user)],
                          s.email_change_window_seconds)
    await confirm_attempt(settings, limiter, user, request)
    requested = await recovery.request_email_change(
        db, settings, hasher, mail_worker, profiles, factors, user, str(body.email),
        password_text(body.current_password),
        factor={"code": body.code, "challenge_id": body.challenge_id,
                "credential": body.credential})
    await limiter.forgive("password-confirm", user.id, all_of_them=True)
    return JSONResponse(await fresh_view(db, user), status_code=202 if requested else 200,
                        headers=NO_STORE)


@router.post("/email/confirm", responses=problem_doc({400: "invalid_token",
                                                       409: "email_taken"}))
async def confirm_email(body: EmailTokenIn, db: DbDep, settings: SettingsDep,
                        profiles: ProfilesDep, response: Response) -> dict[str, Any]:
    """The token from the mail sent to the new address (no login needed): the email changes
    and is verified."""
    user = await recovery.confirm_email_change(db, settings, profiles, body.token)
    response.headers.update(NO_STORE)
    return account_view(user, await consents.current_consents(db, user.id))


@router.post("/password", status_code=204, response_class=Response,
             responses=problem_doc({401: _FACTOR_DOC, 403: "invalid_credentials"}))
async def change_password(request: Request, body: PasswordChangeIn, user: CurrentUser,
                          principal: CurrentSession, db: DbDep, settings: SettingsDep,
                          limiter: LimiterDep, hasher: HasherDep, mail_worker: MailWorkerDep,
                          profiles: ProfilesDep, logins: LoginsDep,
                          factors: SecondFactorsDep) -> Response:
    await confirm_attempt(settings, limiter, user, request)

    async def second_factor() -> None:
        await mfa.require_second_factor(db, factors, user, code=body.code,
                                        challenge_id=body.challenge_id,
                                        credential=body.credential)

    await accounts.change_password(db, settings, hasher, mail_worker, profiles, logins, user,
                                   password_text(body.current_password), body.new_password,
                                   keep_sid=principal.sid, check_factor=second_factor)
    await limiter.forgive("password-confirm", user.id, all_of_them=True)
    return Response(status_code=204, headers=NO_STORE)


@router.get("/export")
async def export_me(user: CurrentUserAnyPolicy, db: DbDep, usage_recorder: UsageDep,
                    audit_trail: AuditTrailDep, session_store: SessionsDep) -> Response:
    """Everything held on the user, as one machine-readable JSON download (P5 portability)."""
    try:  # events still buffered on this instance are included
        await usage_recorder.flush()
        await audit_trail.flush()
    except Exception:  # the flushers retry; the export still answers with what is stored
        log.warning("flush before export failed; exporting what is stored")
    usage = await usage_log_of(db, user.id)
    audit_rows = (await db.exec(select(AuditEvent).where(AuditEvent.user_id == user.id)
                                .order_by(col(AuditEvent.at), col(AuditEvent.id)))).all()
    sessions = await session_store.list(user.id)
    document = {
        "format": "tessera-export/1",
        "account": {**account_view(user, await consents.current_consents(db, user.id)),
                    "updated_at": rfc3339(user.updated_at),
                    "policy_accepted_at": rfc3339(user.policy_accepted_at)
                    if user.policy_accepted_at else None},
        "consents": {
            "current": await consents.current_consents(db, user.id),
            "history": [{"purpose": e.purpose, "granted": e.granted, "at": rfc3339(e.at)}
                        for e in await consents.consent_history(db, user.id)],
        },
        "restrictions": restrictions_view(user),
        "sessions": [{"id": s.sid, "created_at": from_epoch(s.created_at),
                      "expires_at": from_epoch(s.expires_at), "user_agent": s.user_agent}
                     for s in sessions],
        "usage_log": usage,
        "privacy_requests": [privacy_request_view(r) for r in
                             await privacy_requests.user_requests(db, user.id)],
        "mfa": await mfa.export_view(db, user.id),
        # Every time personal data left tessera (the mailing vendor, P8).
        "disclosures": await events.disclosures_of(db, user.id),
        "mails": [{"at": rfc3339(m.sent_at or m.created_at), "kind": m.kind, "to": m.to_addr,
                   "status": m.status} for m in await mails_of(db, user.id)],
        "security_events": [{"at": rfc3339(a.at), "event": a.event, "outcome": a.outcome}
                            for a in audit_rows],
    }
    body = await anyio.to_thread.run_sync(  # a large usage log must not stall the event loop
        lambda: json.dumps(document, ensure_ascii=False, indent=1))
    return Response(
        body, media_type="application/json",
        headers={**NO_STORE, "Content-Disposition":
                 f'attachment; filename="tessera-export-{user.id}.json"'})


@router.delete("", status_code=204, response_class=Response,
               responses=problem_doc({401: _FACTOR_DOC, 403: "invalid_credentials"}))
async def delete_me(request: Request, body: PasswordConfirmIn, user: CurrentUserAnyPolicy,
                    db: DbDep, settings: SettingsDep, limiter: LimiterDep, hasher: HasherDep,
                    factors: SecondFactorsDep, erasure: ErasureDep) -> Response:
    await confirm_attempt(settings, limiter, user, request)
    if not await accounts.verify_password(hasher, user, password_text(body.password)):
        raise Problem("wrong_password", "The password is wrong.")
    await mfa.require_second_factor(db, factors, user, code=body.code,
                                    challenge_id=body.challenge_id, credential=body.credential)
    await erasure.delete_account(db, user)
    attribute_usage(request.scope, "")  # nothing is logged for an account that is gone
    response = Response(status_code=204, headers=NO_STORE)
    clear_login_cookies(response, settings)
    return response


@router.post("/deactivate", status_code=204, response_class=Response)
async def deactivate_me(user: CurrentUser, db: DbDep, profiles: ProfilesDep, logins: LoginsDep,
                        settings: SettingsDep) -> Response:
    await accounts.deactivate(db, profiles, logins, user, actor_id=user.id)
    response = Response(status_code=204, headers=NO_STORE)
    clear_login_cookies(response, settings)
    return response


@router.get("/consents")
async def get_consents(user: CurrentUser, db: DbDep, response: Response) -> dict[str, Any]:
    response.headers.update(NO_STORE)
    return {"purposes": await consents.current_consents(db, user.id)}


@router.put("/consents/{purpose}", responses=problem_doc({404: "not_found"}))
async def put_consent(purpose: Annotated[str, Path(max_length=64)], body: ConsentIn,
                      user: CurrentUser, db: DbDep, settings: SettingsDep,
                      profiles: ProfilesDep, response: Response) -> dict[str, Any]:
    await accounts.set_consent(db, settings, profiles, user, purpose, body.granted)
    response.headers.update(NO_STORE)
    return {"purposes": await consents.current_consents(db, user.id)}


@router.put("/restrictions")
async def put_restrictions(body: RestrictionsIn, user: CurrentUser, db: DbDep,
                           profiles: ProfilesDep, response: Response) -> dict[str, bool]:
    user = await accounts.set_restrictions(db, profiles, user,
                                           restrict=body.restrict_processing,
                                           object_to=body.object_to_processing)
    response.headers.update(NO_STORE)
    return restrictions_view(user)


@router.post("/policy-consent", status_code=204, response_class=Response,
             responses=problem_doc({409: "policy_outdated"}))
async def policy_consent(body: PolicyConsentIn, user: CurrentUserAnyPolicy, db: DbDep,
                         policies: PolicyDep, profiles: ProfilesDep) -> Response:
    await accounts.accept_policy(db, policies, profiles, user, body.version)
    return Response(status_code=204, headers=NO_STORE)


@router.post("/privacy-requests", status_code=201)
async def create_privacy_request(body: PrivacyRequestIn, user: CurrentUser, db: DbDep,
                                 response: Response) -> dict[str, Any]:
    row = await privacy_requests.file_request(db, user.id, body.kind, body.region, body.message)
    response.headers.update(NO_STORE)
    return privacy_request_view(row)


@router.get("/privacy-requests")
async def list_privacy_requests(user: CurrentUser, db: DbDep,
                                response: Response) -> list[dict[str, Any]]:
    response.headers.update(NO_STORE)
    return [privacy_request_view(r) for r in await privacy_requests.user_requests(db, user.id)]
