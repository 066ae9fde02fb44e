"""tessera_verify: Claims carry amr/auth_time; `verifier.require(mfa=True)` keeps a route
for users who logged in with two factors."""

from __future__ import annotations

import httpx
from fastapi import Depends, FastAPI

from tessera_verify import Claims, TesseraVerifier
from tests.conftest import SERVICE_KEY, bearer, client_for, registered_token
from tests.test_mfa import enrol_totp, mfa_token_for, totp_code


def downstream(verifier: TesseraVerifier) -> FastAPI:
    api = FastAPI()

    @api.get("/profile")
    async def profile(user: Claims = Depends(verifier)) -> dict[str, object]:
        return {"sub": user.sub, "amr": list(user.amr), "auth_time": user.auth_time}

    @api.post("/payouts")
    async def payouts(user: Claims = Depends(verifier.require(mfa=True))) -> dict[str, str]:
        return {"ok": user.sub}

    return api


async def test_require_mfa_refuses_a_password_only_login(client, app: FastAPI) -> None:
    user, password_token = await registered_token(client)
    secret, _ = await enrol_totp(client, password_token)
    done = await client.post("/auth/login/mfa", json={
        "mfa_token": await mfa_token_for(client, user["email"]), "code": totp_code(secret, 1)})
    strong_token = done.json()["access_token"]

    for introspect in (False, True):
        async with client_for(app) as to_tessera:
            verifier = TesseraVerifier("http://testserver", http_client=to_tessera,
                                       service_key=SERVICE_KEY, introspect=introspect)
            service = downstream(verifier)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=service),
                                         base_url="http://service") as calls:
                weak = await calls.get("/profile", headers=bearer(password_token))
                assert weak.status_code == 200
                assert weak.json()["amr"] == ["pwd"]
                refused = await calls.post("/payouts", headers=bearer(password_token))
                assert refused.status_code == 403
                assert "insufficient_user_authentication" in refused.headers["www-authenticate"]
                strong = await calls.get("/profile", headers=bearer(strong_token))
                assert strong.json()["amr"] == ["pwd", "otp", "mfa"]
                assert isinstance(strong.json()["auth_time"], int)
                allowed = await calls.post("/payouts", headers=bearer(strong_token))
                assert allowed.status_code == 200 and allowed.json() == {"ok": user["id"]}
                assert (await calls.post("/payouts")).status_code == 401
