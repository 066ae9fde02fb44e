"""A downstream service that accepts tessera's tokens, checked locally with tessera_verify.

Run tessera (`make run`, with TESSERA_SERVICE_KEYS=<key> to follow revocations), then:

    python examples/downstream/app.py --tessera http://127.0.0.1:8000 --service-key <key>
    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8001/hello

Tokens are verified against tessera's published keys, without a call per request; with a
service key the app also follows tessera's revocation feed, so a token is refused here
within a second of its logout, and while the feed is down it asks tessera instead.
"""

import argparse
import os
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI

from tessera_verify import Claims, TesseraVerifier


def create_app(tessera_url: str, service_key: str | None = None, *, issuer: str = "tessera",
               audience: str = "tessera") -> FastAPI:
    verifier = TesseraVerifier(tessera_url, issuer=issuer, audience=audience,
                               service_key=service_key,
                               introspect="fallback" if service_key else False)
    CurrentUser = Annotated[Claims, Depends(verifier)]  # noqa: N806 (a type alias)
    # Follows the revocation feed while the app runs (when there is a service key).
    app = FastAPI(title="downstream example", lifespan=verifier.lifespan)

    @app.get("/hello")
    async def hello(user: CurrentUser) -> dict[str, str]:
        return {"hello": user.sub, "session": user.sid}

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "revocation_feed": verifier.feed_live}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tessera", default=os.environ.get("DOWNSTREAM_TESSERA_URL",
                                                            "http://127.0.0.1:8000"))
    parser.add_argument("--service-key", default=os.environ.get("DOWNSTREAM_SERVICE_KEY"))
    parser.add_argument("--issuer", default="tessera")
    parser.add_argument("--audience", default="tessera")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    app = create_app(args.tessera, args.service_key, issuer=args.issuer, audience=args.audience)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
