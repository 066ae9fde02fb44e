"""A real HTTP receiver on loopback for tests: webhooks, the mailing vendor, an upstream
behind a proxy. It records every request and answers with `status` (200 unless set)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.servers import LOOPBACK, free_port


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    port: int = field(default_factory=free_port)
    status: int = 200
    location: str | None = None  # sent with the answer (a redirect test)
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                receiver.received.append(Received(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                    body))
                payload = json.dumps({"path": self.path,
                                      "user": self.headers.get("x-auth-user-id")}).encode()
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/json")
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in list(self.received) if predicate(r)]
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing matching arrived; got {self.received!r}")
            time.sleep(0.05)


def verify_signature(secret: str, received: Received, tolerance: int = 300) -> bool:
    """What a receiver does (docs/events.md): HMAC-SHA256 over `id.timestamp.body` with the
    secret's bytes after `whsec_`, compared with each `v1,` signature; a stale timestamp is
    refused."""
    msg_id = received.headers["webhook-id"]
    timestamp = received.headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + received.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, sig.split(",", 1)[1])
               for sig in received.headers["webhook-signature"].split() if sig.startswith("v1,"))
