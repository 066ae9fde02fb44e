"""Issue 12.7: tessera reads its own cookies strictly: the exact name (a name prefixed with
0xA0, 0x85 or a tab is another cookie), and a name sent twice counts as not sent."""

from __future__ import annotations

import httpx
import pytest
from starlette.datastructures import Headers

from tessera.api.cookies import read_cookie
from tests.conftest import login, register


def headers(*values: str) -> Headers:
    return Headers(raw=[(b"cookie", v.encode("latin-1")) for v in values])


@pytest.mark.parametrize(("sent", "expected"), [
    ("session=abc", "abc"),
    ("a=1; session=abc; b=2", "abc"),
    ("a=1;session=abc", "abc"),                   # no space after ';'
    ("session=", None),                           # empty is absent
    ("\xa0session=abc", None),                    # NBSP-prefixed name is another cookie
    ("\x85session=abc", None),                    # NEL
    ("\tsession=abc", None),                      # tab
    ("a=1; \xa0session=abc", None),
    ("session =abc", None),                       # not the exact name
    ("Session=abc", None),                        # names are case-sensitive
    ("session=abc; session=evil", None),          # twice: refused
    ("xsession=abc", None),
    ("session=a=b", "a=b"),                       # '=' belongs to the value
])
def test_read_cookie(sent: str, expected: str | None) -> None:
    assert read_cookie(headers(sent), "session") == expected


def test_a_name_across_two_cookie_headers_is_twice() -> None:
    assert read_cookie(headers("session=abc", "other=1"), "session") == "abc"
    assert read_cookie(headers("session=abc", "session=evil"), "session") is None


async def test_the_session_cookie_is_read_strictly(client: httpx.AsyncClient) -> None:
    user = await register(client)
    response = await login(client, user["email"])
    token, csrf = response.json()["access_token"], response.json()["csrf_token"]
    client.cookies.clear()

    async def me(cookie: str) -> int:
        return (await client.get("/me", headers=[(b"cookie", cookie.encode("latin-1"))])).status_code

    assert await me(f"session={token}") == 200
    for lookalike in ("\xa0", "\x85", "\t"):
        assert await me(f"{lookalike}session={token}") == 401
    assert await me(f"session={token}; session=junk") == 401
    assert await me(f"session=junk; session={token}") == 401

    async def logout_all(cookie: str) -> int:
        return (await client.post("/auth/logout-all", headers=[
            (b"cookie", cookie.encode("latin-1")), (b"x-csrf-token", csrf.encode())])).status_code

    # the csrf cookie likewise: a look-alike name does not count as the csrf cookie
    assert await logout_all(f"session={token}; \xa0csrf={csrf}") == 403
    assert await logout_all(f"session={token}; csrf={csrf}; csrf=x") == 403
    assert await logout_all(f"session={token}; csrf={csrf}") == 204
