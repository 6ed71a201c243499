"""A real HTTP/1.1 webhook receiver on 127.0.0.1 that records every request and can be scripted.

Standard library only (``asyncio.start_server``). Every request is answered and then
the connection closed (``Connection: close``), so each delivery attempt is one
connection and nothing is pooled between scripted behaviours.

Scripting (``Reply`` objects, consumed per request in order, per path or for any path):

* ``status`` and ``body`` / ``headers``: a plain answer;
* ``delay``: wait this many seconds before answering (a slow receiver);
* ``stream_bytes``: send this many body bytes (a huge answer, announced with its
  Content-Length), or ``endless=True`` to stream chunked data until the client
  hangs up;
* ``redirect_to``: a 302 with ``Location`` pointing at another path of this receiver.

When nothing is scripted, every request gets ``default`` (a plain 200 unless set).
``down()`` closes the listening socket (connection refused), ``up()`` opens it again
on the same port. ``stop()`` (or leaving ``async with``) closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

HOST = "127.0.0.1"
_REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    302: "Found",
    400: "Bad Request",
    404: "Not Found",
    410: "Gone",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_CHUNK = b"x" * 65536


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float  # time.time() when the body had been read


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    stream_bytes: int = 0
    endless: bool = False
    redirect_to: str | None = None
    stall: float = 0.0  # seconds between the head and the body


class WebhookReceiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._script: deque[Reply] = deque()
        self._path_script: dict[str, deque[Reply]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.streamed_bytes = 0  # body bytes written by stream/endless replies
        self.default = Reply()  # the answer when nothing is scripted

    # ----- lifecycle ---------------------------------------------------------------------

    async def start(self) -> WebhookReceiver:
        self._server = await asyncio.start_server(self._accept, HOST, self.port)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        return self

    async def down(self) -> None:
        """Stop listening: connecting now fails with connection refused."""
        if self._server is not None:
            self._server.close()  # closes the listening socket at once
            self._server = None
            await asyncio.sleep(0)

    async def up(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        await self.down()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def __aenter__(self) -> WebhookReceiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----- scripting ---------------------------------------------------------------------

    def url(self, path: str = "/hook") -> str:
        return f"http://{HOST}:{self.port}{path}"

    def then(self, *replies: Reply, path: str | None = None) -> None:
        """Answer the next requests (to ``path``, or any path) with these replies, in order."""
        if path is None:
            self._script.extend(replies)
        else:
            self._path_script.setdefault(path, deque()).extend(replies)

    def status(self, code: int, times: int = 1, **kwargs: object) -> None:
        self.then(*[Reply(status=code, **kwargs) for _ in range(times)])  # type: ignore[arg-type]

    def received(self, path: str | None = None) -> list[Received]:
        return [r for r in self.requests if path is None or r.path == path]

    def _next_reply(self, path: str) -> Reply:
        queue = self._path_script.get(path)
        if queue:
            return queue.popleft()
        if self._script:
            return self._script.popleft()
        return self.default

    # ----- HTTP --------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client hung up (a timeout, or an excerpt read)
        except asyncio.CancelledError:
            # stop() at teardown: end quietly (asyncio's stream callback would log a
            # cancelled handler task as an error).
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        received = Received(method, target, headers, body, time.time())
        self.requests.append(received)
        await self._answer(self._next_reply(target), writer)

    async def _answer(self, reply: Reply, writer: asyncio.StreamWriter) -> None:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        status = 302 if reply.redirect_to is not None else reply.status
        headers = {"Connection": "close", **reply.headers}
        if reply.redirect_to is not None:
            headers["Location"] = self.url(reply.redirect_to)
        if reply.endless:
            headers["Transfer-Encoding"] = "chunked"
        elif reply.stream_bytes:
            headers["Content-Length"] = str(reply.stream_bytes)
        else:
            headers["Content-Length"] = str(len(reply.body))
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode("latin-1"))
        if reply.stall:
            await writer.drain()
            await asyncio.sleep(reply.stall)
        if reply.endless:
            while True:  # until the client hangs up (ConnectionError) or stop() cancels us
                writer.write(b"%x\r\n%s\r\n" % (len(_CHUNK), _CHUNK))
                await writer.drain()
                self.streamed_bytes += len(_CHUNK)
        elif reply.stream_bytes:
            left = reply.stream_bytes
            while left > 0:
                piece = _CHUNK[: min(left, len(_CHUNK))]
                writer.write(piece)
                await writer.drain()
                self.streamed_bytes += len(piece)
                left -= len(piece)
        else:
            writer.write(reply.body)
        await writer.drain()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)
