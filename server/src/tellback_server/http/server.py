"""uvicorn, adapted to long-lived streams and process managers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

REPEAT_WINDOW_S = 1.0
# A request's head (request line and headers) arrives within this, from the connection's
# start or the request's first byte, or the connection is closed (408).
HEAD_TIMEOUT_S = 15.0
# And is at most this large, in at most this many headers (431).
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100


class _HeadTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits it lacks on a request's head.

    httptools takes headers of any size and uvicorn waits for them without end: a
    connection that trickles a header line every few seconds held its file descriptor
    for ever (enough of them and the process could accept nothing, its health probe
    included), and one 15 MiB head took some 140 MiB to parse. nginx's
    ``client_header_timeout`` and ``large_client_header_buffers``, in the server
    itself: a head must be complete within :data:`HEAD_TIMEOUT_S` and
    :data:`MAX_HEAD_BYTES` (:data:`MAX_HEADERS` headers). A connection that sends
    nothing after a response is uvicorn's keep-alive timeout's."""

    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _head_count = 0
    _too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._head_count = 0
        self._await_head()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value), 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_done()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._too_large:
            super().send_400_response(msg)
            return
        body = b"Request Header Fields Too Large"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()

    def _count(self, size: int, headers: int) -> None:
        self._head_bytes += size
        self._head_count += headers
        if self._head_bytes > MAX_HEAD_BYTES or self._head_count > MAX_HEADERS:
            self._too_large = True
            raise _HeadTooLarge  # httptools stops; uvicorn answers (send_400_response)

    def _await_head(self) -> None:
        self._head_done()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _head_done(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if (self.cycle is not None and not self.cycle.response_complete) or self.pipeline:
            # A pipelined head waits for the requests before it (uvicorn stops reading
            # meanwhile): its time starts over rather than cut their responses.
            self._await_head()
            return
        if not self.transport.is_closing():
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server that ends live streams first when it stops.

    uvicorn waits for open connections before it runs the app's shutdown, and
    an SSE stream never ends by itself: ``on_stop`` (the events broker's
    ``close``) ends every stream cleanly, so a stop takes milliseconds, not the
    graceful-shutdown timeout. Without uvicorn's re-raise of SIGTERM, a
    graceful stop exits with status 0, as process managers expect; a second
    signal forces the exit, unless it came within ``REPEAT_WINDOW_S`` of the
    first: that is the same stop delivered twice (``uv run`` forwards the
    SIGTERM or SIGINT that a process manager or a terminal also sends to the
    whole process group), and forcing would cut the requests in flight.
    """

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_stop = on_stop
        self._first_request = 0.0

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def request_exit(self) -> None:
        now = time.monotonic()
        if not self.should_exit:
            self._first_request = now
        elif now - self._first_request >= REPEAT_WINDOW_S:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        if self._on_stop is not None:
            self._on_stop()
        await super().shutdown(sockets)
