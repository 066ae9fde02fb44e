"""Verify tessera tokens in another service (no tessera server code needed). See README."""

from tessera_verify.verifier import (
    Claims,
    TesseraVerifier,
    TokenRejected,
    VerifierUnavailable,
)

__all__ = ["Claims", "TesseraVerifier", "TokenRejected", "VerifierUnavailable"]
