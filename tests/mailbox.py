"""A real SMTP server for the tests (aiosmtpd on a free loopback port), and helpers to read
what tessera delivered to it."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import ssl
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

TOKEN_IN_LINK = re.compile(r"#token=([A-Za-z0-9_-]+)")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    @property
    def kind(self) -> str:
        return str(self.message["X-Tessera-Kind"])

    @property
    def text(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        assert part is not None
        return str(part.get_content())  # type: ignore[attr-defined]

    @property
    def html(self) -> str:
        part = self.message.get_body(preferencelist=("html",))
        assert part is not None
        return str(part.get_content())  # type: ignore[attr-defined]

    @property
    def token(self) -> str:
        found = TOKEN_IN_LINK.search(self.text)
        assert found, "no link with a token in the mail"
        return found.group(1)


class _Collect:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.original_content or envelope.content,
                                           policy=email.policy.default)
        with self.server.lock:
            self.server.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                                 message))  # type: ignore[arg-type]
        return "250 OK"


class SmtpServer:
    """aiosmtpd in its own thread; `stop()` and `start()` again on the same port model an
    outage. With `credentials`, AUTH is required (over plain text: loopback only)."""

    def __init__(self, port: int, credentials: tuple[str, str] | None = None, *,
                 tls: str | None = None, cert: tuple[Path, Path] | None = None) -> None:
        """`tls`: None (plain), "starttls" (offered and required) or "implicit" (SMTPS),
        with `cert` = (certificate file, key file)."""
        self.port = port
        self.credentials = credentials
        self.tls = tls
        self.cert = cert
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self._controller: Controller | None = None

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and self.credentials is not None
              and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials)
        return AuthResult(success=ok)

    def start(self) -> None:
        kw: dict[str, Any] = {}
        if self.credentials is not None:
            kw = {"authenticator": self._authenticate, "auth_required": True,
                  # aiosmtpd counts only STARTTLS as TLS: on SMTPS it would hide AUTH.
                  "auth_require_tls": self.tls == "starttls"}
        if self.tls is not None:
            assert self.cert is not None
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.cert)
            if self.tls == "starttls":
                kw.update(tls_context=context, require_starttls=True)
            else:
                kw["ssl_context"] = context
        self._controller = Controller(_Collect(self), hostname="127.0.0.1", port=self.port,
                                      ready_timeout=10, **kw)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def url(self) -> str:
        scheme = "smtps" if self.tls == "implicit" else "smtp"
        if self.credentials:
            user, password = self.credentials
            return f"{scheme}://{user}:{password}@127.0.0.1:{self.port}"
        return f"{scheme}://127.0.0.1:{self.port}"

    def to(self, address: str, kind: str | None = None) -> list[Received]:
        with self.lock:
            return [m for m in self.received if address.lower() in
                    [r.lower() for r in m.rcpt_tos] and (kind is None or m.kind == kind)]

    async def wait_for(self, address: str, kind: str | None = None, count: int = 1,
                       within: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + within
        while True:
            found = self.to(address, kind)
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, f"{len(found)} {kind} mails to {address}, not {count}"
                return found
            await asyncio.sleep(0.05)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA): (certificate file, key file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file
