"""How a service authenticates to tessera (introspection, the revocation feed): a service
key (`TESSERA_SERVICE_KEYS`) by `Authorization: Bearer`, HTTP Basic or the `client_secret`
form field."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from urllib.parse import unquote

from pydantic import SecretStr
from starlette.types import Scope

from tessera.errors import Problem


def _service_key_ok(service_keys: Sequence[SecretStr], presented: str) -> bool:
    ok = False
    for key in service_keys:  # no early exit: every key is compared
        ok |= bool(presented) and hmac.compare_digest(presented.encode(),
                                                     key.get_secret_value().encode())
    return ok


def _client_secret(scope: Scope, fields: dict[str, list[str]]) -> str:
    """The service key, by `Authorization: Bearer`, HTTP Basic (`client_secret_basic`: any
    client id, the key as the secret) or the `client_secret` form field
    (`client_secret_post`)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            scheme, credentials = scheme.lower(), credentials.strip()
            if scheme == "bearer":
                return credentials
            if scheme == "basic":
                try:
                    decoded = base64.b64decode(credentials, validate=True).decode()
                except (binascii.Error, ValueError):  # also non-ASCII input, bad UTF-8
                    return ""
                # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding.
                return unquote(decoded.partition(":")[2].replace("+", " "))
            return ""
    return fields.get("client_secret", [""])[0]


def require_service_key(scope: Scope, service_keys: Sequence[SecretStr],
                        fields: dict[str, list[str]]) -> None:
    """Introspection and the revocation feed are for services holding a service key."""
    if not _service_key_ok(service_keys, _client_secret(scope, fields)):
        raise Problem("invalid_client", "A valid service key is required.",
                      headers={"WWW-Authenticate": 'Bearer realm="tessera-services", '
                                                       'Basic realm="tessera-services"'})
