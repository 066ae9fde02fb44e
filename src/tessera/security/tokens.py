"""Access tokens: EdDSA JWTs (`typ: at+jwt`) tied to a server-side session.

One verifier serves routes, introspection and the downstream helper: a token is valid
while its session exists in Redis and the session holds this token's hash. The stored
hash proves tessera issued exactly this token, so tessera's own check costs one Redis
read and a hash compare; other services check the signature against the JWKS instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt

from tessera.stores.keys import KeyRing

_MAX_TOKEN_LENGTH = 4096
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class IssuedToken:
    token: str
    sid: str
    jti: str
    iat: int
    exp: int


@dataclass(frozen=True)
class UnverifiedClaims:
    """The payload read without checking the signature: only good for finding the session."""

    sub: str
    sid: str
    exp: int
    raw: dict[str, Any]


def token_hash(key: bytes, token: str) -> str:
    """Keyed: a session record written into Redis by anyone without the secret matches no
    token, so the stored hash can stand in for the signature check on tessera's own path."""
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


def new_session_id() -> str:
    return secrets.token_urlsafe(18)


def issue_token(keys: KeyRing, *, sub: str, sid: str, ttl_seconds: int, issuer: str,
                audience: str, now: int | None = None, amr: list[str] | None = None,
                auth_time: int | None = None) -> IssuedToken:
    key = keys.current
    if key is None or key.private is None:
        raise RuntimeError("no current signing key")
    iat = int(now if now is not None else time.time())
    exp = iat + ttl_seconds
    jti = secrets.token_urlsafe(12)
    claims: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": sub, "sid": sid,
                              "iat": iat, "exp": exp, "jti": jti}
    if amr is not None:  # how the user authenticated (RFC 8176), and when (OIDC auth_time)
        claims["amr"] = amr
        claims["auth_time"] = auth_time if auth_time is not None else iat
    token = jwt.encode(claims, key.private, algorithm="EdDSA",
                       headers={"kid": key.kid, "typ": "at+jwt"})
    return IssuedToken(token, sid, jti, iat, exp)


def peek_claims(token: str) -> UnverifiedClaims | None:
    """Read `sub`, `sid`, `exp` from a well-formed JWT without verifying it; None if malformed."""
    if not token or len(token) > _MAX_TOKEN_LENGTH or token.count(".") != 2:
        return None
    try:
        payload_b64 = token.split(".")[1]
        payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[…" JSON
        return None
    if not isinstance(payload, dict):
        return None
    sub, sid, exp = payload.get("sub"), payload.get("sid"), payload.get("exp")
    if not (isinstance(sub, str) and isinstance(sid, str) and isinstance(exp, int)):
        return None
    # Ids tessera makes are hex (users) and base64url (sessions): anything else (a lone
    # surrogate, a brace that would break the Redis hash tag) is no token of ours, and must
    # not reach a Redis command that other requests' reads share.
    if not (_ID.fullmatch(sub) and _ID.fullmatch(sid)):
        return None
    return UnverifiedClaims(sub, sid, exp, payload)
