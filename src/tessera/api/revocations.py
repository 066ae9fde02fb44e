"""GET /auth/revocations: the revocation feed, as server-sent events.

Every deleted session is published on Redis (`tessera:revocations`, see app/sessions.py).
Each instance holds one subscription, started with its first feed client and stopped after
its last, and fans every message out to all of its clients through one queue per client.
A client is answered only once the subscription is live, so it misses nothing from then on.
Should the subscription break, every stream ends: a client that reconnects knows it may have
missed events, which a stream that stayed open could not tell it.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tessera.api.deps import RedisDep, ServiceCaller
from tessera.errors import Problem
from tessera.stores.redis import AnyRedis
from tessera.stores.sessions import REVOCATION_CHANNEL

log = logging.getLogger("tessera.revocations")

router = APIRouter(prefix="/auth", tags=["auth"])

HEARTBEAT_SECONDS = 15.0
SUBSCRIBE_TIMEOUT_SECONDS = 5.0
# Events queued for one client that does not read them; past this it is dropped (and
# reconnects) rather than let the instance's memory grow without bound.
MAX_PENDING_EVENTS = 10_000
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


class FeedUnavailable(Exception):
    """The instance cannot subscribe to the revocation channel (Redis down, or shutting down)."""


class FeedClient:
    """One connected stream: the events it has still to send, then None to end it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.ended = False

    def offer(self, event: str) -> bool:
        if self.ended:
            return False
        if self.queue.qsize() >= MAX_PENDING_EVENTS:
            self.end()
            return False
        self.queue.put_nowait(event)
        return True

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(None)


def _event_data(raw: Any) -> str | None:
    """The `data:` of one event, re-encoded from the published message (one line, 3 fields)."""
    try:
        message = json.loads(raw)
        event = {"sid": message["sid"], "sub": message["sub"], "exp": message["exp"]}
    except (TypeError, ValueError, KeyError):
        return None
    if not (isinstance(event["sid"], str) and isinstance(event["sub"], str)
            and isinstance(event["exp"], int)):
        return None
    return json.dumps(event, separators=(",", ":"))


class RevocationHub:
    """One Redis subscription per instance, fanned out to every feed client."""

    def __init__(self, redis: AnyRedis, *,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.redis = redis
        self.heartbeat_seconds = heartbeat_seconds
        self._clients: set[FeedClient] = set()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def client_count(self) -> int:
        return len(self._clients)

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.done()

    async def join(self) -> FeedClient:
        """A new client, returned once the subscription is live; FeedUnavailable otherwise."""
        if self._closed:
            raise FeedUnavailable("shutting down")
        client = FeedClient()
        self._clients.add(client)
        if self._listener is None or self._listener.done():
            loop = asyncio.get_running_loop()
            subscribed: asyncio.Future[None] = loop.create_future()
            subscribed.add_done_callback(lambda f: f.exception())  # retrieved, if no one waits
            self._subscribed = subscribed
            # A fresh context: the listener outlives the request that started it.
            self._listener = loop.create_task(self._listen(subscribed),
                                              name="tessera-revocation-hub",
                                              context=contextvars.Context())
        assert self._subscribed is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._subscribed), SUBSCRIBE_TIMEOUT_SECONDS)
        except BaseException as exc:
            self.leave(client)
            if isinstance(exc, (FeedUnavailable, TimeoutError)):
                raise FeedUnavailable("no subscription to the revocation channel") from exc
            raise
        return client

    def leave(self, client: FeedClient) -> None:
        self._clients.discard(client)

    def close(self) -> None:
        """End every stream and the subscription; later joins fail (the server is stopping)."""
        self._closed = True
        self._end_all()
        if self._listener is not None:
            self._listener.cancel()

    async def aclose(self) -> None:
        listener = self._listener
        self.close()
        if listener is not None:
            with suppress(asyncio.CancelledError):
                await listener

    def _end_all(self) -> None:
        clients, self._clients = self._clients, set()
        for client in clients:
            client.end()

    def _detach(self) -> None:
        """This listener is finished: the next join starts a new one."""
        if self._listener is asyncio.current_task():
            self._listener = None
            self._subscribed = None

    async def _listen(self, subscribed: asyncio.Future[None]) -> None:
        pubsub = self.redis.pubsub()
        try:
            await self.redis.initialize()  # a RedisCluster maps its nodes first
            await pubsub.subscribe(REVOCATION_CHANNEL)
            while True:
                if not self._clients:
                    self._detach()  # no await between this check and the detach
                    return
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    if not subscribed.done():
                        subscribed.set_result(None)
                elif message["type"] == "message":
                    self._fan_out(message["data"])
        except asyncio.CancelledError:
            self._detach()
            raise
        except Exception as exc:  # Redis went away: end the streams, clients reconnect
            log.warning("revocation subscription lost: %s: %s", type(exc).__name__, exc)
            self._detach()
            if not subscribed.done():
                subscribed.set_exception(FeedUnavailable(str(exc)))
            self._end_all()
        finally:
            if not subscribed.done():
                subscribed.set_exception(FeedUnavailable("the subscription ended"))
            with suppress(Exception):
                await pubsub.aclose()

    def _fan_out(self, raw: Any) -> None:
        event = _event_data(raw)
        if event is None:
            log.warning("ignored a malformed message on %s", REVOCATION_CHANNEL)
            return
        for client in list(self._clients):
            if not client.offer(event):
                log.warning("dropped a revocation feed client that does not keep up")
                self._clients.discard(client)


def revocation_hub(app: FastAPI, redis: AnyRedis) -> RevocationHub:
    """The instance's hub, made on first use and hung on app.state."""
    hub: RevocationHub | None = getattr(app.state, "revocation_hub", None)
    if hub is None:
        hub = RevocationHub(redis)
        app.state.revocation_hub = hub
        _end_streams_on_exit(hub)
    return hub


async def close_revocation_hub(app: FastAPI) -> None:
    """For the lifespan's shutdown: end the streams and the subscription."""
    hub: RevocationHub | None = getattr(app.state, "revocation_hub", None)
    if hub is not None:
        await hub.aclose()


def _end_streams_on_exit(hub: RevocationHub) -> None:
    """uvicorn lets open responses finish before it shuts down (and before the lifespan's
    shutdown), and an event stream never finishes by itself: so when the server is told to
    stop (SIGTERM, SIGINT), end the streams first, then let the server's own handler run."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue  # no Python handler to chain to: not running under uvicorn

        def handler(sig: int, frame: Any, previous: Any = previous) -> None:
            with suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(hub.close)
            previous(sig, frame)

        signal.signal(signum, handler)


async def _events(hub: RevocationHub, client: FeedClient) -> AsyncIterator[str]:
    # `retry`: how long an EventSource waits before it reconnects; the comment flushes the
    # headers at once, so the caller knows it is subscribed.
    yield "retry: 1000\n: subscribed\n\n"
    while True:
        try:
            event = await asyncio.wait_for(client.queue.get(), hub.heartbeat_seconds)
        except TimeoutError:
            yield ": heartbeat\n\n"
            continue
        chunk: list[str] = []
        while event is not None:
            chunk.append(f"data: {event}\n\n")
            if client.queue.empty():
                break
            event = client.queue.get_nowait()
        if chunk:
            yield "".join(chunk)
        if event is None:
            return


class EventStreamResponse(StreamingResponse):
    """The stream of one client; it leaves the hub however the response ends."""

    def __init__(self, hub: RevocationHub, client: FeedClient) -> None:
        super().__init__(_events(hub, client), media_type="text/event-stream",
                         headers=STREAM_HEADERS)
        self._hub = hub
        self._client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._hub.leave(self._client)


@router.get(
    "/revocations",
    response_class=StreamingResponse,
    summary="Revocation feed (server-sent events)",
    responses={
        200: {"description": "One event per session deleted from now on, "
                             '`data: {"sid": …, "sub": …, "exp": …}`; a comment every '
                             f"{int(HEARTBEAT_SECONDS)} s keeps the stream alive.",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        401: {"description": "invalid_client: a service key from TESSERA_SERVICE_KEYS is "
                             "required, as `Authorization: Bearer <key>`"},
        503: {"description": "unavailable: no subscription to Redis"},
    },
)
async def revocations(request: Request, service: ServiceCaller,
                      redis: RedisDep) -> EventStreamResponse:
    """Follow session deletions, to reject logged-out tokens that are verified locally."""
    hub = revocation_hub(request.app, redis)
    try:
        client = await hub.join()
    except FeedUnavailable:
        raise Problem("unavailable", "The revocation feed is unavailable; retry later.",
                      headers={"Retry-After": "1"}) from None
    return EventStreamResponse(hub, client)
