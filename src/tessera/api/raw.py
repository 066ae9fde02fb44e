"""An answer as plain ASGI messages, for the lean endpoints (api/lean.py, api/forward.py):
what Starlette's Response sends, headers in the same order, without building a Response
object (and its header list) per request."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send


class RawResponse:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status,
                    "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def json_response(body: bytes, status: int = 200) -> RawResponse:
    """`Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})`."""
    return RawResponse(status, [(b"cache-control", b"no-store"),
                                (b"content-length", b"%d" % len(body)),
                                (b"content-type", b"application/json")], body)
