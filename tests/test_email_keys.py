"""Issue 12.2: one email key rule, the same at registration, login, email change and admin
search. Distinct addresses never collide (long s, sharp s, fullwidth local parts); the same
address in another case, in NFD or with an IDN domain in another form is one account."""

from __future__ import annotations

import secrets

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import update

from tessera.domain.accounts import email_key
from tessera.stores.models import User
from tests.conftest import PASSWORD, bearer, login, register, registered_token


@pytest.mark.parametrize(("one", "other"), [
    ("\u017fam@example.com", "sam@example.com"),          # long s is not s
    ("stra\u00dfe@example.com", "strasse@example.com"),    # sharp s is not ss
    ("\uff41lice@example.com", "alice@example.com"),       # a fullwidth local part is not ASCII
    ("a@stra\u00dfe.de", "a@strasse.de"),                  # IDNA 2008: distinct domains
    ("\u0130@example.com", "i@example.com"),               # dotted capital I
])
def test_distinct_addresses_have_distinct_keys(one: str, other: str) -> None:
    assert email_key(one) != email_key(other)


@pytest.mark.parametrize(("one", "other"), [
    ("Alice@EXAMPLE.com", "alice@example.com"),
    ("  alice@example.com ", "alice@example.com"),
    ("cafe\u0301@example.com", "caf\u00e9@example.com"),  # NFD and NFC
    ("STRA\u00dfE@example.com", "stra\u00dfe@example.com"),
    ("a@B\u00dcCHER.de", "a@xn--bcher-kva.de"),            # an IDN in Unicode and punycode
    ("a@\uff45xample.com", "a@example.com"),               # a fullwidth domain is one domain
])
def test_one_address_in_other_forms_has_one_key(one: str, other: str) -> None:
    assert email_key(one) == email_key(other)


def test_keys_of_unparseable_input_never_raise() -> None:
    assert email_key("not an email") == "not an email"
    assert email_key("X@") == "x@"


async def test_the_rule_holds_at_registration_login_and_admin_search(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    tag = secrets.token_hex(4)
    sam = await register(client, f"sam-{tag}@example.com")
    long_s = await register(client, f"\u017fam-{tag}@example.com")
    assert sam["id"] != long_s["id"]
    await register(client, f"stra\u00dfe-{tag}@example.com")
    await register(client, f"strasse-{tag}@example.com")
    taken = await client.post("/auth/register", json={
        "email": f"SAM-{tag}@EXAMPLE.COM", "password": sam["password"], "is_adult": True})
    assert taken.status_code == 409 and taken.json()["code"] == "email_taken"
    nfd = await register(client, f"cafe\u0301-{tag}@example.com")
    taken = await client.post("/auth/register", json={
        "email": f"caf\u00e9-{tag}@example.com", "password": nfd["password"], "is_adult": True})
    assert taken.status_code == 409

    # The long-s account's password does not log in as sam, and the other way round.
    assert (await login(client, f"Sam-{tag}@Example.com")).json()["session_id"]
    token = (await login(client, f"\u017fam-{tag}@example.com")).json()["access_token"]
    assert (await client.get("/me", headers=bearer(token))).json()["id"] == long_s["id"]

    admin_user, admin = await registered_token(client)
    async with app.state.tessera.db_factory() as db:
        await db.exec(update(User).where(User.id == admin_user["id"]).values(is_admin=True))
        await db.commit()
    found = (await client.get("/admin/users", params={"email": f"SAM-{tag}@example.com"},
                              headers=bearer(admin))).json()
    assert [u["id"] for u in found] == [sam["id"]]

    # PATCH /me to an address that is the same under the rule is taken; a look-alike is not.
    _, other = await registered_token(client)
    taken = await client.patch("/me", json={"email": f"sam-{tag}@EXAMPLE.com",
                                            "current_password": PASSWORD},
                               headers=bearer(other))
    assert taken.status_code == 409
    moved = await client.patch("/me", json={"email": f"\u017f\u017fam-{tag}@example.com",
                                            "current_password": PASSWORD},
                               headers=bearer(other))
    assert moved.status_code == 202, moved.text  # a confirmation goes to the look-alike


def test_migration_0006_rekeys_existing_accounts(tmp_path, base_settings) -> None:  # type: ignore[no-untyped-def]
    """Accounts keyed by casefold() before get the new key (and can log in with their
    address); a collision under the new rule keeps the old key; the downgrade goes back."""
    import asyncio
    from datetime import UTC, datetime, timedelta

    from alembic import command

    from tessera.ops.migrate import alembic_config
    from tests.test_usage_segments import _execute

    url = base_settings["database_url"]
    own = f"tessera_keys_{secrets.token_hex(4)}"
    if "postgres" in url:
        asyncio.run(_execute(url, f"CREATE DATABASE {own}", autocommit=True))
        url = url.rsplit("/", 1)[0] + "/" + own
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
    try:
        command.upgrade(alembic_config(url), "0002")
        now = datetime.now(UTC)
        rows = [("u1", "Stra\u00dfe@Example.com", "strasse@example.com"),
                ("u2", "Sam@Example.com", "sam@example.com"),
                ("u3", "a@\uff45xample.org", "a@\uff45xample.org"),
                ("u4", "a@example.org", "a@example.org")]
        asyncio.run(_execute(url, (
            "INSERT INTO users (id, email, email_key, is_active, is_admin, created_at, "
            "updated_at, policy_seq, restrict_processing, object_to_processing) VALUES "
            "(:id, :email, :key, true, false, :t, :t, 0, false, false)",
            [{"id": i, "email": e, "key": k, "t": now + timedelta(seconds=n)}
             for n, (i, e, k) in enumerate(rows)])))
        command.upgrade(alembic_config(url), "0006")
        keys = dict(asyncio.run(_execute(url, "SELECT id, email_key FROM users")))
        # u3's new key is u4's: u3 keeps its old one (and the migration warns)
        assert keys == {"u1": "stra\u00dfe@example.com", "u2": "sam@example.com",
                        "u3": "a@\uff45xample.org", "u4": "a@example.org"}
        assert keys["u1"] == email_key("Stra\u00dfe@Example.com")
        command.downgrade(alembic_config(url), "0002")
        keys = dict(asyncio.run(_execute(url, "SELECT id, email_key FROM users")))
        assert keys["u1"] == "strasse@example.com" and keys["u2"] == "sam@example.com"
    finally:
        if "postgres" in base_settings["database_url"]:
            asyncio.run(_execute(base_settings["database_url"],
                                 f"DROP DATABASE IF EXISTS {own}", autocommit=True))
