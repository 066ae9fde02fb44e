"""Second-factor rules: TOTP (RFC 6238), recovery codes, passkeys (WebAuthn), the two-step
login's `mfa_token`, and the check sensitive changes make.

`amr` values (RFC 8176): `pwd` password, `otp` a TOTP or recovery code, `hwk` a passkey
(proof of a hardware-bound key), `user` the authenticator verified the user (PIN or
biometrics), `mfa` when two factors were used.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyotp
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import parse_authentication_credential_json
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from tessera.config import Settings
from tessera.domain.accounts import Logins, user_changed, user_changing
from tessera.domain.profiles import ProfileCache, generation_key
from tessera.errors import Problem
from tessera.security.tokens import IssuedToken
from tessera.stores import mfa as store
from tessera.stores import mfa_login as logins
from tessera.stores.keys import b64url, b64url_decode
from tessera.stores.models import User
from tessera.stores.ratelimit import AttemptLimiter
from tessera.stores.redis import AnyRedis
from tessera.timeutil import rfc3339

TOTP_DIGITS = 6
TOTP_PERIOD = 30
RECOVERY_CODES = 10


@dataclass(frozen=True)
class SecondFactors:
    """What the second-factor rules use, built once: the settings (lifetimes, limits, the
    relying party), Redis (single-use mfa_tokens, WebAuthn challenges, the TOTP replay
    guard), the attempt limiter, the box stored TOTP secrets and recovery codes are sealed
    with, and the profile cache (a factor change moves the user's generation)."""

    settings: Settings
    redis: AnyRedis
    limiter: AttemptLimiter
    box: store.SecretBox
    profiles: ProfileCache


def invalid_code() -> Problem:
    return Problem("invalid_code", "The code is wrong, expired or already used.")


# --- what is enrolled ---------------------------------------------------------------------

@dataclass(frozen=True)
class Enrolled:
    totp: bool
    passkeys: int
    recovery_codes_left: int
    totp_sealed: str | None = None  # the confirmed TOTP secret, as stored (encrypted)

    @property
    def any(self) -> bool:
        return self.totp or self.passkeys > 0

    @property
    def methods(self) -> list[str]:
        methods = ["totp"] if self.totp else []
        if self.recovery_codes_left:
            methods.append("recovery_code")
        if self.passkeys:
            methods.append("passkey")
        return methods


async def enrolled(db: AsyncSession, user_id: str) -> Enrolled:
    """One round trip: every login asks this after the password."""
    sealed, passkeys, codes_left = await store.factor_counts(db, user_id)
    return Enrolled(totp=sealed is not None, passkeys=passkeys, recovery_codes_left=codes_left,
                    totp_sealed=sealed)


def passkey_view(key: store.Passkey) -> dict[str, Any]:
    return {"id": key.id, "name": key.name, "created_at": rfc3339(key.created_at),
            "last_used_at": rfc3339(key.last_used_at) if key.last_used_at else None}


async def mfa_view(db: AsyncSession, user_id: str) -> dict[str, Any]:
    """GET /me/mfa."""
    state = await enrolled(db, user_id)
    return {"totp": state.totp,
            "passkeys": [passkey_view(k) for k in await store.passkeys_of(db, user_id)],
            "recovery_codes_left": state.recovery_codes_left}


async def export_view(db: AsyncSession, user_id: str) -> dict[str, Any]:
    """The export's `mfa`: which factors, when; never a secret, code or key."""
    totp = await store.get_totp(db, user_id)
    codes = await store.recovery_codes(db, user_id)
    return {
        "totp": None if totp is None else {
            "created_at": rfc3339(totp.created_at),
            "confirmed_at": rfc3339(totp.confirmed_at) if totp.confirmed_at else None},
        "recovery_codes": {
            "total": len(codes), "left": sum(1 for c in codes if c.used_at is None),
            "created_at": rfc3339(codes[0].created_at) if codes else None,
            "used_at": sorted(rfc3339(c.used_at) for c in codes if c.used_at)},
        "passkeys": [passkey_view(k) for k in await store.passkeys_of(db, user_id)],
    }


# --- TOTP ---------------------------------------------------------------------------------

def _totp(secret: str) -> pyotp.TOTP:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD)


def matching_step(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step (now, or one either side for clock drift) whose code this is."""
    shaped = totp_shaped(code)
    if shaped is None:
        return None
    code = shaped
    totp = _totp(secret)
    current = int((time.time() if now is None else now) // TOTP_PERIOD)
    found = None
    for step in (current - 1, current, current + 1):  # no early exit: same time either way
        if hmac.compare_digest(totp.at(step * TOTP_PERIOD), code):
            found = step
    return found


async def start_totp(db: AsyncSession, factors: SecondFactors, user: User) -> dict[str, str]:
    existing = await store.get_totp(db, user.id)
    if existing is not None and existing.confirmed_at is not None:
        raise Problem("totp_already_enabled",
                      "TOTP is already active; disable it first to enrol a new authenticator.")
    secret = pyotp.random_base32()  # 160 bits, as RFC 4226 recommends for SHA-1
    try:
        await store.put_pending_totp(db, user.id, factors.box.encrypt(secret, user.id))
    except IntegrityError:  # confirmed by a concurrent request since the check above
        await db.rollback()
        raise Problem("totp_already_enabled",
                      "TOTP is already active; disable it first to enrol a new "
                      "authenticator.") from None
    uri = _totp(secret).provisioning_uri(name=user.email or user.id,
                                         issuer_name=factors.settings.mfa_issuer)
    return {"secret": secret, "otpauth_uri": uri}


async def confirm_totp(db: AsyncSession, factors: SecondFactors, user: User,
                       code: str) -> list[str]:
    factor = await store.get_totp(db, user.id)
    if factor is None or factor.confirmed_at is not None:
        raise Problem("no_pending_totp", "Start a TOTP enrolment first (POST /me/mfa/totp).")
    await count_attempt(factors, user.id)
    step = matching_step(factors.box.decrypt(factor.secret_enc, user.id), code)
    # The first code is spent like every later one (the replay guard), before the commit.
    if step is None or not await logins.accept_step(
            factors.redis, user.id, logins.factor_id(factor.secret_enc), step) \
            or not await store.confirm_totp(db, user.id):
        await db.rollback()
        raise Problem("invalid_enrolment_code", "The code is wrong or expired.")
    codes = store.new_recovery_codes(RECOVERY_CODES)
    await store.replace_recovery_codes(db, factors.box, user.id, codes)
    await db.commit()
    await forgive_attempts(factors, user.id)
    return codes


async def disable_totp(db: AsyncSession, factors: SecondFactors, user_id: str) -> None:
    await store.delete_totp(db, user_id)
    # A pending second step recorded with this factor's codes takes the full check (which
    # finds no factor), not the one-script path (stores/mfa_login.py): the generation moves
    # before the commit and after it (accounts.user_changing).
    await user_changing(factors.profiles, user_id)
    await db.commit()
    await user_changed(factors.profiles, user_id)


async def regenerate_recovery_codes(db: AsyncSession, factors: SecondFactors,
                                    user: User) -> list[str]:
    codes = store.new_recovery_codes(RECOVERY_CODES)
    await store.replace_recovery_codes(db, factors.box, user.id, codes)
    await db.commit()
    return codes


async def check_code(db: AsyncSession, factors: SecondFactors, user_id: str,
                     code: str) -> list[str] | None:
    """Consume a TOTP code (a later time step than any accepted before) or an unused
    recovery code; the amr it earns, or None. Commits what it consumed."""
    if len(code) > 64:
        return None
    return await check_code_with(db, factors, user_id, code, await store.get_totp(db, user_id))


async def check_code_with(db: AsyncSession, factors: SecondFactors, user_id: str, code: str,
                          factor: store.TotpFactor | None, *,
                          now: float | None = None) -> list[str] | None:
    """`check_code` with the user's TOTP factor already loaded (the login loads it with the
    user, in one query): the time step taken in Redis (the replay guard, atomic across
    instances; `mfa_login.accept_step`), or the recovery code's conditional UPDATE and
    COMMIT. `now`: the clock (tests)."""
    if len(code) > 64:
        return None
    if factor is not None and factor.confirmed_at is not None:
        step = matching_step(factors.box.decrypt(factor.secret_enc, user_id), code, now)
        if step is not None:
            if await logins.accept_step(factors.redis, user_id,
                                        logins.factor_id(factor.secret_enc), step):
                return ["otp"]
            return None  # a replay within its window
    if len(store.normalise_code(code)) == 12 and await store.use_recovery_code(
            db, factors.box, user_id, code):
        await db.commit()
        return ["otp"]
    await db.rollback()
    return None


# --- attempt limits -----------------------------------------------------------------------

async def count_attempt(factors: SecondFactors, user_id: str) -> None:
    """Counted before the check: 10 per account and window (all instances), the same
    counter as the login's second step (`begin_second_step`)."""
    s = factors.settings
    await logins.count_account_attempt(factors.redis, user_id,
                                       maximum=s.mfa_max_failures_per_account,
                                       window=s.login_failure_window_seconds)


async def forgive_attempts(factors: SecondFactors, user_id: str) -> None:
    await logins.forgive_account(factors.redis, user_id)


# --- the two-step login -------------------------------------------------------------------

def password_fingerprint(user: User) -> str:
    """Binds an mfa_token to the password it was earned with: a change voids the token."""
    return hashlib.sha256((user.password_hash or "").encode()).hexdigest()[:32]


# The first step's amr the one-script second step signs its token for (`finish_with_totp`):
# a password. A passkey's first step (amr hwk) takes the full check.
_PASSWORD_FIRST = json.dumps(["pwd"])


def _code_macs(factors: SecondFactors, user_id: str, secret: str, start: float,
               ttl: int) -> dict[str, str]:
    """`c<step>`: the MAC of the TOTP code of each time step an mfa_token issued at `start`
    and living `ttl` s can be used in (one step of drift either side), for at most 24 steps
    (a longer life: the later steps take the full check)."""
    totp = _totp(secret)
    first = int(start // TOTP_PERIOD) - 1
    last = min(int((start + ttl) // TOTP_PERIOD) + 1, first + 23)
    return {f"c{step}": factors.box.totp_mac(user_id, step, totp.at(step * TOTP_PERIOD))
            for step in range(first, last + 1)}


async def mfa_required(factors: SecondFactors, user: User, amr: list[str], state: Enrolled, *,
                       epoch: str, generation: str | None = None,
                       other_than: str | None = None) -> Problem | None:
    """The first factor was right: a single-use token for the second step, in Redis, and
    the 401 that hands it out. `epoch`: the user's auth epoch as read before the first factor
    was checked; the token is kept only if it is still the same (None: a change that ends
    sessions came between, the login is superseded), and so is the second step's session.
    `generation`: the user's profile generation, read with the epoch before the user's row
    and factors: given, and with TOTP enrolled, the token gets what the one-script second
    step needs (`finish_with_totp`); it runs only while neither has moved since."""
    # `<user id>.<secret>`: the second step finds the token under the user's hash tag, so it
    # is taken in the same Redis script that writes the session (stores/mfa_login.py).
    mfa_token = f"{user.id}.{secrets.token_urlsafe(32)}"
    now = time.time()
    ttl = factors.settings.mfa_token_ttl_seconds
    record = {"uid": user.id, "amr": amr, "pw": password_fingerprint(user),
              "at": int(now), "ep": epoch}
    fields: dict[str, str] = {}
    if state.totp_sealed is not None and generation is not None:
        secret = factors.box.decrypt(state.totp_sealed, user.id)
        fields = {"a": json.dumps(amr), "e": epoch, "g": generation,
                  "f": "1" if user.restrict_processing or user.object_to_processing else "0",
                  "k": logins.factor_id(state.totp_sealed),
                  **_code_macs(factors, user.id, secret, now, ttl)}
    if not await logins.put(factors.redis, user.id, mfa_token, record, ttl, epoch=epoch,
                            fields=fields):
        return None
    return Problem("mfa_required", "A second factor is needed to finish logging in.",
                   extra={"mfa_token": mfa_token,
                          "methods": [m for m in state.methods if m != other_than],
                          "expires_in": ttl})


@dataclass(frozen=True)
class SecondStep:
    """A second login step under way: what its mfa_token recorded, the attempt counted.
    `take` and `forget` go to `open_session`: the token is spent and the account's counter
    cleared in the script that writes the session."""

    user_id: str
    amr: list[str]
    password: str  # the password's fingerprint at the first step
    epoch: str
    take: str
    forget: tuple[str, ...]


def _token_user(mfa_token: str) -> str | None:
    user_id, dot, rest = mfa_token.partition(".")
    if not dot or len(user_id) != 32 or not rest or len(mfa_token) > 128:
        return None
    if any(ch not in "0123456789abcdef" for ch in user_id):
        return None
    return user_id


async def begin_second_step(factors: SecondFactors, mfa_token: str) -> SecondStep | None:
    """The mfa_token's record, this attempt counted (5 per mfa_token, 10 per account and
    window; 429 past either) before any factor is checked: one Redis round trip. None for
    an unknown, used or expired token (nothing counted)."""
    user_id = _token_user(mfa_token)
    if user_id is None:
        return None
    s = factors.settings
    pending = await logins.begin(factors.redis, user_id, mfa_token,
                                 max_per_token=s.mfa_max_failures_per_token,
                                 max_per_account=s.mfa_max_failures_per_account,
                                 window=s.login_failure_window_seconds)
    return _second_step(user_id, pending)


def _second_step(user_id: str, pending: logins.PendingLogin | None) -> SecondStep | None:
    if pending is None or pending.record.get("uid") != user_id:
        return None
    record = pending.record
    return SecondStep(user_id=user_id, amr=list(record["amr"]), password=str(record["pw"]),
                      epoch=str(record.get("ep", "0")), take=pending.key,
                      forget=(logins.account_key(user_id),))


def totp_shaped(code: str | None) -> str | None:
    """The code as six digits (spaces taken out, as `matching_step` does), or None: a code
    the one-script second step can check."""
    if code is None:
        return None
    code = code.strip().replace(" ", "")
    return code if len(code) == TOTP_DIGITS and code.isdigit() else None


@dataclass(frozen=True)
class Finish:
    """What `finish_with_totp` did: `issued` the session's token (logged in); or
    `pending` the second step the full check must finish (the attempt already counted);
    or neither, a wrong or replayed code. `restricted`: the user restricted processing or
    objected to it (as of the first step, which nothing changed since)."""

    user_id: str
    issued: IssuedToken | None = None
    pending: SecondStep | None = None
    restricted: bool = False


async def finish_with_totp(factors: SecondFactors, accounts_logins: Logins, mfa_token: str,
                           code: str, user_agent: str | None) -> Finish | None:
    """The TOTP second step in one Redis round trip and no database work
    (stores/mfa_login.py `finish`): the code's MAC for each step it may be of (now, or one
    either side), compared with those the first step kept, the step taken, the token spent
    and the session written in one script, while the user's epoch and profile generation
    are still those of the first step. None for an unknown, used or expired token. `code`:
    six digits (`totp_shaped`)."""
    user_id = _token_user(mfa_token)
    if user_id is None:
        return None
    current = int(time.time() // TOTP_PERIOD)
    macs = [(step, factors.box.totp_mac(user_id, step, code))
            for step in (current - 1, current, current + 1)]
    issued, session = await accounts_logins.prepare(user_id, user_agent,
                                                    full_amr(["pwd"], ["otp"]))
    s = factors.settings
    out = await logins.finish(factors.redis, accounts_logins.sessions, user_id, mfa_token,
                              amr=_PASSWORD_FIRST, macs=macs, session=session,
                              generation_key=generation_key(user_id),
                              max_per_token=s.mfa_max_failures_per_token,
                              max_per_account=s.mfa_max_failures_per_account,
                              window=s.login_failure_window_seconds)
    if out is None:
        return None
    if out.pending is not None:
        step = _second_step(user_id, out.pending)
        return None if step is None else Finish(user_id, pending=step)
    restricted = out.flags == "1"
    if not out.done:
        return Finish(user_id, restricted=restricted)
    accounts_logins.opened()
    return Finish(user_id, issued=issued, restricted=restricted)


async def login_state(db: AsyncSession, user_id: str) -> tuple[User | None,
                                                               store.TotpFactor | None]:
    """The second step's reads: the user and their TOTP factor, in one query."""
    return await store.user_with_totp(db, user_id)


def invalid_mfa_token() -> Problem:
    return Problem("invalid_mfa_token",
                   "The mfa_token is unknown, used or expired; log in again.")


# --- second factor for sensitive changes --------------------------------------------------

async def require_second_factor(db: AsyncSession, factors: SecondFactors, user: User, *,
                                code: str | None, challenge_id: str | None = None,
                                credential: dict[str, Any] | None = None) -> None:
    """Where a factor is enrolled, a sensitive change needs one: a TOTP or recovery code, or
    a passkey assertion (from POST /auth/passkey/options). 401 `mfa_required` without one,
    401 `invalid_code` for a wrong one."""
    state = await enrolled(db, user.id)
    if not state.any:
        return
    if not code and credential is None:
        raise Problem("mfa_required",
                      "This account has a second factor: send `code` (or a passkey assertion).",
                      extra={"methods": state.methods})
    await count_attempt(factors, user.id)
    if credential is not None:
        ok = await check_assertion(db, factors, challenge_id, credential,
                                   user_id=user.id) is not None
    else:
        assert code is not None
        ok = await check_code(db, factors, user.id, code) is not None
    if not ok:
        raise invalid_code()
    await forgive_attempts(factors, user.id)


# --- WebAuthn -----------------------------------------------------------------------------

def relying_party(settings: Settings) -> tuple[str, list[str]]:
    """(rp id, allowed origins) from TESSERA_WEBAUTHN_RP_ID / _ORIGINS / TESSERA_PUBLIC_URL."""
    parts = urlsplit(settings.public_url)
    rp_id = settings.webauthn_rp_id or parts.hostname or "localhost"
    origins = settings.webauthn_origins or [f"{parts.scheme}://{parts.netloc}"]
    return rp_id, origins


def _challenge_key(challenge_id: str) -> str:
    return "tessera:webauthn-challenge:" + hashlib.sha256(challenge_id.encode()).hexdigest()


async def _new_challenge(factors: SecondFactors, purpose: str,
                         user_id: str | None) -> tuple[str, bytes]:
    challenge_id, challenge = secrets.token_urlsafe(24), secrets.token_bytes(32)
    await factors.redis.set(_challenge_key(challenge_id),
                            json.dumps({"c": b64url(challenge), "p": purpose, "u": user_id}),
                            ex=factors.settings.webauthn_challenge_ttl_seconds)
    return challenge_id, challenge


async def _take_challenge(factors: SecondFactors, challenge_id: str | None, purpose: str,
                          user_id: str | None) -> bytes | None:
    """Single use (GETDEL), short-lived, for one purpose (and one user when registering)."""
    if not challenge_id or len(challenge_id) > 128:
        return None
    raw = await factors.redis.getdel(_challenge_key(challenge_id))
    if raw is None:
        return None
    record = json.loads(raw)
    if record["p"] != purpose or record["u"] != user_id:
        return None
    return b64url_decode(record["c"])


def _transports(raw: str | None) -> list[AuthenticatorTransport] | None:
    known = {tr.value: tr for tr in AuthenticatorTransport}
    out = [known[p] for p in (raw or "").split(",") if p in known]
    return out or None


async def registration_options(db: AsyncSession, factors: SecondFactors,
                               user: User) -> dict[str, Any]:
    rp_id, _ = relying_party(factors.settings)
    handle = await store.webauthn_handle(db, user.id, create=True)
    assert handle is not None
    challenge_id, challenge = await _new_challenge(factors, "register", user.id)
    options = generate_registration_options(
        rp_id=rp_id, rp_name=factors.settings.webauthn_rp_name,
        user_id=b64url_decode(handle), user_name=user.email or "tessera user",
        challenge=challenge, timeout=factors.settings.webauthn_challenge_ttl_seconds * 1000,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED,  # discoverable: log in without email
            user_verification=UserVerificationRequirement.PREFERRED),
        exclude_credentials=[
            PublicKeyCredentialDescriptor(id=b64url_decode(k.credential_id),
                                          transports=_transports(k.transports))
            for k in await store.passkeys_of(db, user.id)])
    return {**json.loads(options_to_json(options)), "challenge_id": challenge_id}


def invalid_credential(detail: str = "The passkey could not be verified.") -> Problem:
    return Problem("invalid_credential", detail)


async def register_passkey(db: AsyncSession, factors: SecondFactors, user: User, challenge_id: str,
                           credential: dict[str, Any], name: str) -> store.Passkey:
    challenge = await _take_challenge(factors, challenge_id, "register", user.id)
    if challenge is None:
        raise invalid_credential("The challenge is unknown, used or expired.")
    rp_id, origins = relying_party(factors.settings)
    try:  # the library raises several types for malformed input; each is a bad credential
        verified = verify_registration_response(
            credential=credential, expected_challenge=challenge, expected_rp_id=rp_id,
            expected_origin=origins, require_user_verification=False)
    except Exception:
        raise invalid_credential() from None
    response = credential.get("response")
    transports = response.get("transports") if isinstance(response, dict) else None
    key = store.Passkey(
        user_id=user.id, credential_id=b64url(verified.credential_id),
        public_key=b64url(verified.credential_public_key), sign_count=verified.sign_count,
        name=name, backed_up=verified.credential_backed_up,
        transports=",".join(str(x) for x in transports)[:255]
        if isinstance(transports, list) else None)
    db.add(key)
    try:
        await db.commit()
    except IntegrityError:
        await db.rollback()
        raise invalid_credential("This passkey is registered already.") from None
    await db.refresh(key)
    return key


async def authentication_options(factors: SecondFactors) -> dict[str, Any]:
    rp_id, _ = relying_party(factors.settings)
    challenge_id, challenge = await _new_challenge(factors, "authenticate", None)
    options = generate_authentication_options(
        rp_id=rp_id, challenge=challenge,
        timeout=factors.settings.webauthn_challenge_ttl_seconds * 1000,
        user_verification=UserVerificationRequirement.PREFERRED)
    return {**json.loads(options_to_json(options)), "challenge_id": challenge_id}


@dataclass(frozen=True)
class Assertion:
    user_id: str
    amr: list[str]


async def check_assertion(db: AsyncSession, factors: SecondFactors, challenge_id: str | None,
                          credential: dict[str, Any], *,
                          user_id: str | None = None) -> Assertion | None:
    """A passkey assertion over a fresh challenge by a registered passkey (of `user_id`, when
    given); the sign counter moves on. None for anything else."""
    challenge = await _take_challenge(factors, challenge_id, "authenticate", None)
    if challenge is None:
        return None
    try:
        parsed = parse_authentication_credential_json(credential)
    except Exception:
        return None
    key = await store.passkey_by_credential(db, b64url(parsed.raw_id))
    if key is None or (user_id is not None and key.user_id != user_id):
        return None  # a foreign passkey
    handle = parsed.response.user_handle
    if handle is not None and b64url(handle) != await store.webauthn_handle(
            db, key.user_id, create=False):
        return None
    rp_id, origins = relying_party(factors.settings)
    try:
        verified = verify_authentication_response(
            credential=parsed, expected_challenge=challenge, expected_rp_id=rp_id,
            expected_origin=origins, credential_public_key=b64url_decode(key.public_key),
            credential_current_sign_count=key.sign_count, require_user_verification=False)
    except Exception:
        return None
    if not await store.record_passkey_use(db, key, verified.new_sign_count,
                                          verified.credential_backed_up):
        await db.rollback()
        return None
    await db.commit()
    return Assertion(key.user_id, ["hwk", "user"] if verified.user_verified else ["hwk"])


async def delete_passkey(db: AsyncSession, user_id: str, passkey_id: str) -> bool:
    key = await db.get(store.Passkey, passkey_id)
    if key is None or key.user_id != user_id:
        return False
    await db.delete(key)
    await db.commit()
    return True


def full_amr(*parts: list[str]) -> list[str]:
    """The amr of a login from its factors: `mfa` once two kinds of factor are in."""
    amr: list[str] = []
    for part in parts:
        amr.extend(v for v in part if v not in amr)
    kinds = sum(1 for v in ("pwd", "otp", "hwk", "user") if v in amr)
    if kinds >= 2:
        amr.append("mfa")
    return amr

