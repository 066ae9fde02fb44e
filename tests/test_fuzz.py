"""Property-based fuzzing of the whole HTTP API, driven by tessera's own OpenAPI schema.

Schemathesis generates valid and invalid requests for every operation the schema declares
(its coverage phase adds boundary values and wrong methods) and sends them in-process,
through ASGI, to a real app on real stores: SQLite in a temporary folder and an embedded
Redis of its own (never a PostgreSQL or a Redis given in the environment).

Every answer must pass:
- `not_a_server_error`: no 5xx, whatever the input;
- `status_code_conformance`, `content_type_conformance`, `response_schema_conformance`:
  the status, the media type and the body are the ones the schema documents;
- the contract's own rules (API.md), as extra checks below: every error is problem+json with
  `status`, `title`, `detail` and a snake_case `code` (422s add `errors`), no stack trace,
  a 401 for a missing or bad token or service key says `WWW-Authenticate`, answers carrying
  a token or personal data say `no-store`, every answer says `Tk` and `Vary: DNT, Sec-GPC`,
  and a live credential is never refused.

Protected operations run twice per example: with a valid `Authorization: Bearer` token (a
user's, or an admin's for /admin, a service key for introspection) and with none.

Bounded in time: few examples per operation, derandomised (the same cases on every run, so
the gate does not flake); `TESSERA_FUZZ_EXAMPLES=200 pytest tests/test_fuzz.py` digs deeper.
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tessera.config import Settings
from tessera.main import create_app
from tessera.ops import migrate

SERVICE_KEY = "fuzz-service-key-" + "x" * 24
PASSWORD = "correct horse battery staple"
MAX_EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "8"))
BASE = "http://testserver"


def _settings(data_dir: Path) -> Settings:
    # Every store named explicitly, so nothing in the environment or a .env points this run
    # at a real database or Redis.
    return Settings(
        data_dir=data_dir, database_url=f"sqlite+aiosqlite:///{data_dir / 'tessera.db'}",
        redis_url=None, secret_key=None, cors_origins=[], cookie_secure=False,
        bcrypt_rounds=4, service_keys=[SERVICE_KEY], register_max_per_ip=10**6,
        login_max_failures_per_ip=10**6, login_max_failures_per_account=10**6,
        usage_flush_seconds=0.2)


# The schema is read at import (pytest parametrizes from it) from an app that is built but
# never started: no file, database or Redis is touched. Requests go to `fuzz_app` below.
# (Not `schemathesis.pytest.from_fixture`: its lazy loader breaks on pytest 9, where test
# items have no `_nodeid` any more.)
schema = schemathesis.openapi.from_dict(
    create_app(_settings(Path("/nonexistent/tessera-fuzz"))).openapi())
# Wrong-method probes (405) are asked for a few methods only: they cost time, prove little.
schema.config.phases.coverage.unexpected_methods = {"put", "trace"}

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]

# Known gaps in the schema, exempted here: none left (each entry would name one).
UNDECLARED_CONTENT_TYPE: set[tuple[str, str]] = set()
UNDECLARED_422_ERRORS: set[str] = set()

# Answers that end the caller's session (or its account): the identity is made again after.
ENDS_SESSION = {("POST", "/auth/logout"), ("POST", "/auth/logout-all"),
                ("POST", "/me/deactivate"), ("DELETE", "/me")}
# A new substantial policy gates every older account: fresh accounts are made after one.
GATES_ACCOUNTS = {("POST", "/admin/policy")}


class Identities:
    """A user and an admin with live tokens, made through the API and made again when a
    fuzzed request has ended their session or gated their account."""

    def __init__(self, app: Any, db_path: Path) -> None:
        self.app = app
        self.db_path = db_path
        self._tokens: dict[str, str] = {}

    def token(self, role: str) -> str:
        if role not in self._tokens:
            self._tokens[role] = self._make(admin=role == "admin")
        return self._tokens[role]

    def forget(self, role: str | None = None) -> None:
        if role is None:
            self._tokens.clear()
        else:
            self._tokens.pop(role, None)

    def _make(self, *, admin: bool) -> str:
        email = f"fuzz-{secrets.token_hex(6)}@example.com"
        with asgi.get_client(self.app) as client:
            created = client.post(f"{BASE}/auth/register",
                                  json={"email": email, "password": PASSWORD, "is_adult": True})
            assert created.status_code == 201, created.text
            if admin:  # the admin role has no API: set it in the database (as the CLI does)
                with sqlite3.connect(self.db_path) as db:
                    db.execute("UPDATE users SET is_admin = 1 WHERE id = ?",
                               (created.json()["id"],))
            logged_in = client.post(f"{BASE}/auth/login",
                                    json={"email": email, "password": PASSWORD})
            assert logged_in.status_code == 200, logged_in.text
            return str(logged_in.json()["access_token"])


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    data_dir = tmp_path_factory.mktemp("tessera-fuzz")
    app_settings = _settings(data_dir)
    migrate.upgrade(app_settings)
    try:
        yield create_app(app_settings), data_dir / "tessera.db"
    finally:
        asgi.shutdown_lifespans()


@pytest.fixture
def identities(fuzz_app: tuple[Any, Path]) -> Identities:
    # Per operation: schemathesis starts the app's lifespan (on its own event loop) at the
    # first request of each test item and its pytest plugin stops it after the item; the
    # embedded Redis, sessions included, goes with it, so tokens are made again per item.
    return Identities(*fuzz_app)


def _under(path: str, *prefixes: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _role(operation: Any) -> str | None:
    """Whose credentials a request to this operation carries (None: it is public)."""
    path = operation.path
    if path in ("/auth/introspect", "/auth/revocations"):
        return "service"
    if _under(path, "/admin"):
        return "admin"
    if operation.definition.raw.get("security") or path == "/auth/logout":
        return "user"
    return None


# --- the contract's rules, as checks ------------------------------------------------------

_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
_PERSONAL = ("/me", "/auth/sessions", "/auth/register", "/auth/login", "/auth/introspect",
             "/admin/users", "/admin/privacy-requests")


def _header(response: Any, name: str) -> str:
    values = response.headers.get(name.lower()) or []
    return ", ".join(values)


def errors_are_problems(ctx: Any, response: Any, case: Any) -> None:
    """API.md: every error is problem+json with status, title, detail, code; 422s add errors;
    never a stack trace."""
    assert b"Traceback" not in (response.content or b""), "a stack trace in the body"
    if response.status_code < 400:
        return
    media = _header(response, "content-type").split(";")[0].strip()
    assert media == "application/problem+json", f"error answered as {media!r}"
    body = response.json()
    assert isinstance(body, dict), body
    assert body.get("status") == response.status_code, body
    assert isinstance(body.get("title"), str) and isinstance(body.get("detail"), str), body
    assert isinstance(body.get("code"), str) and _SNAKE.match(body["code"]), body
    if response.status_code == 422 and body["code"] not in UNDECLARED_422_ERRORS:
        assert isinstance(body.get("errors"), list), body
        assert all(isinstance(e, dict) and "loc" in e and "msg" in e for e in body["errors"])
    if body["code"] in ("not_authenticated", "invalid_client"):
        assert _header(response, "www-authenticate").startswith("Bearer"), "no WWW-Authenticate"


def privacy_headers(ctx: Any, response: Any, case: Any) -> None:
    """API.md: every answer says Tk (T or N) and Vary: DNT, Sec-GPC; an answer carrying a
    token or personal data says Cache-Control: no-store."""
    assert _header(response, "tk") in ("T", "N"), "no Tk header"
    vary = _header(response, "vary")
    assert "DNT" in vary and "Sec-GPC" in vary, f"Vary is {vary!r}"
    if response.status_code < 300 and response.content and _under(case.path, *_PERSONAL):
        assert "no-store" in _header(response, "cache-control"), "personal data without no-store"


EXTRA_CHECKS = [errors_are_problems, privacy_headers]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck), print_blob=False)
def test_api_holds_up_under_generated_requests(case: Any, identities: Identities) -> None:
    method, path = case.method.upper(), case.path
    role = _role(case.operation)
    variants: list[tuple[str | None, dict[str, str]]] = [(None, {})]
    if role == "service" and path != "/auth/revocations":
        # GET /auth/revocations runs without a key only: with one it is an endless stream.
        variants.append((role, {"Authorization": f"Bearer {SERVICE_KEY}"}))
    elif role in ("user", "admin"):
        variants.append((role, {"Authorization": f"Bearer {identities.token(role)}"}))
    checks = CHECKS
    if (method, path) in UNDECLARED_CONTENT_TYPE:
        checks = [c for c in CHECKS if c is not content_type_conformance]
    for used_role, headers in variants:
        response = case.call(app=identities.app, headers=headers)
        try:
            case.validate_response(response, checks=checks, additional_checks=EXTRA_CHECKS,
                                   headers=headers)
            if used_role in ("user", "admin", "service"):
                # The token or key is live (nothing in this run ended it): never a 401.
                assert response.status_code != 401, f"a live credential refused: {response.text}"
        finally:
            if used_role in ("user", "admin") and (method, path) in ENDS_SESSION \
                    and response.status_code < 300:
                identities.forget(used_role)
            if (method, path) in GATES_ACCOUNTS and response.status_code == 201:
                identities.forget()
