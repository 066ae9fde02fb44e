"""uvicorn's httptools protocol with a bound on the request head: its size and its time.

uvicorn with httptools sets no cap on the request line and headers (a client can stream
100 MB of header bytes into memory) and no timeout until the first request's headers are
complete (a client that connects and sends nothing, or one byte a second, holds its
connection as long as it likes). h11 has `h11_max_incomplete_event_size` but parses in
pure Python, several times slower on every request; this subclass keeps httptools and adds:

- at most `TESSERA_HTTP_MAX_HEAD_BYTES` bytes of request line and headers: past them the
  connection gets a 431 and is closed, before the app sees anything;
- at most `TESSERA_HTTP_HEAD_TIMEOUT_SECONDS` from the connection (or from the first byte
  of a next request on a kept-alive one) to the end of the headers: past it, 408 and close.

It also makes a response one write: uvicorn writes a response's head as soon as the app
sends `http.response.start` and its body with the next message, two send system calls (and,
with TCP_NODELAY, two segments) per response; `_OneWrite` holds the head until the body's
first bytes (at most one loop turn, so a streamed body's head is not held back).

Idle kept-alive connections close after `TESSERA_HTTP_KEEP_ALIVE_SECONDS` (uvicorn's own
`timeout_keep_alive`). `tessera serve` uses it (`http="tessera.ops.http:BoundedHttpToolsProtocol"`).
"""

from __future__ import annotations

import asyncio
import json
from functools import lru_cache
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tessera.config import Settings


class _HeadTooLarge(Exception):
    pass


@lru_cache(maxsize=1)
def _limits() -> tuple[int, float]:
    settings = Settings()
    return settings.http_max_head_bytes, settings.http_head_timeout_seconds


def _problem(status: int, reason: bytes, code: str, detail: str) -> bytes:
    body = json.dumps({"type": "about:blank", "title": reason.decode(), "status": status,
                       "detail": detail, "code": code}).encode()
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, reason),
        b"content-type: application/problem+json\r\n",
        b"cache-control: no-store\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n", body])


_TOO_LARGE = _problem(431, b"Request Header Fields Too Large", "request_header_fields_too_large",
                      "The request line and headers are too large.")
_TIMEOUT = _problem(408, b"Request Timeout", "request_timeout",
                    "The request headers did not arrive in time.")


class _OneWrite:
    """The connection's transport, holding a response head until its body's first bytes so
    that both leave in one write (one system call, one TCP segment) instead of two: uvicorn
    writes the head as soon as the app sends `http.response.start`. A held head is written
    at the latest one loop turn later (a streamed body may start much later), and before a
    close; writes keep their order."""

    __slots__ = ("_transport", "_held", "_loop", "_armed")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._loop = loop
        self._armed = False

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines((held, data))
        elif data[:5] == b"HTTP/" and data[-4:] == b"\r\n\r\n":  # a response head
            self._held = data
            if not self._armed:
                self._armed = True
                self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        self._armed = False
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading ...
        return getattr(self._transport, name)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes, self.head_timeout = _limits()
        self._in_head = True  # waiting for (the rest of) a request line and its headers
        self._head_bytes = 0  # bytes received while in the head
        self._head_size = 0  # request line and header bytes parsed so far
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _OneWrite(transport, self.loop)  # type: ignore[assignment]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head:
            self._refuse(_TIMEOUT)

    def _refuse(self, response: bytes) -> None:
        self._in_head = False
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        if self._in_head:
            self._arm_head_timer()  # a kept-alive connection's next request starts its clock
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse(_TOO_LARGE)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        # A header still arriving (httptools buffers a partial name or value itself).
        if self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse(_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.max_head_bytes:
            raise _HeadTooLarge
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.max_head_bytes:
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._in_head = True  # the next request's head, whose clock starts at its first byte
        self._head_bytes = 0
        super().on_response_complete()
