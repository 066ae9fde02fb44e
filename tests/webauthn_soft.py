"""A software WebAuthn authenticator for tests without a browser: real protocol data (CBOR
attestation `none`, ES256 signatures over authenticatorData + SHA-256(clientDataJSON)),
checked by tessera with the real `webauthn` library. Not a mock: nothing in tessera is
replaced; this plays the part of the browser and the security key."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

UP, UV, AT = 0x01, 0x04, 0x40


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


class SoftAuthenticator:
    """One discoverable credential, as a platform authenticator holds it."""

    def __init__(self, origin: str = "http://127.0.0.1:8000", *, rp_id: str | None = None,
                 user_verification: bool = True) -> None:
        self.origin = origin
        self.rp_id = rp_id
        self.user_verification = user_verification
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.credential_id = os.urandom(32)
        self.sign_count = 0
        self.user_handle: str | None = None

    @property
    def credential_b64(self) -> str:
        return b64url(self.credential_id)

    def _flags(self, extra: int = 0) -> bytes:
        return bytes([UP | (UV if self.user_verification else 0) | extra])

    def _rp_hash(self, rp_id: str) -> bytes:
        return hashlib.sha256((self.rp_id or rp_id).encode()).digest()

    def _client_data(self, kind: str, challenge: str) -> bytes:
        return json.dumps({"type": kind, "challenge": challenge, "origin": self.origin,
                           "crossOrigin": False}).encode()

    def create(self, options: dict[str, Any]) -> dict[str, Any]:
        """navigator.credentials.create(options) -> the PublicKeyCredential JSON."""
        numbers = self.key.public_key().public_numbers()
        cose_key = cbor2.dumps({1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"),
                                -3: numbers.y.to_bytes(32, "big")})
        attested = (bytes(16) + struct.pack(">H", len(self.credential_id))
                    + self.credential_id + cose_key)
        auth_data = (self._rp_hash(options["rp"]["id"]) + self._flags(AT)
                     + struct.pack(">I", self.sign_count) + attested)
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        self.user_handle = options["user"]["id"]
        return {"id": b64url(self.credential_id), "rawId": b64url(self.credential_id),
                "type": "public-key", "authenticatorAttachment": "platform",
                "clientExtensionResults": {},
                "response": {
                    "clientDataJSON": b64url(self._client_data("webauthn.create",
                                                               options["challenge"])),
                    "attestationObject": b64url(attestation),
                    "transports": ["internal"]}}

    def get(self, options: dict[str, Any]) -> dict[str, Any]:
        """navigator.credentials.get(options) -> the PublicKeyCredential JSON."""
        self.sign_count += 1
        auth_data = (self._rp_hash(options["rpId"]) + self._flags()
                     + struct.pack(">I", self.sign_count))
        client_data = self._client_data("webauthn.get", options["challenge"])
        signature = self.key.sign(auth_data + hashlib.sha256(client_data).digest(),
                                  ec.ECDSA(hashes.SHA256()))
        return {"id": b64url(self.credential_id), "rawId": b64url(self.credential_id),
                "type": "public-key", "authenticatorAttachment": "platform",
                "clientExtensionResults": {},
                "response": {"clientDataJSON": b64url(client_data),
                             "authenticatorData": b64url(auth_data),
                             "signature": b64url(signature),
                             "userHandle": self.user_handle}}
