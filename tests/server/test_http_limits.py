"""The limits uvicorn's httptools protocol lacks on a request's head, as `tellback
serve` runs it (``uvicorn_config``): real sockets on 127.0.0.1, uvicorn's own loop."""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tellback_server.cli import raise_open_file_limit, uvicorn_config
from tellback_server.http import server as http_server
from tellback_server.http.server import Server


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)  # three times the head's timeout in these tests
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def _serving(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[int]:
    monkeypatch.setattr(http_server, "HEAD_TIMEOUT_S", 0.5, raising=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = Server(uvicorn_config(_ok, "127.0.0.1", port))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):  # (uvicorn says it has started by a flag)
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task
        sock.close()


async def _ask(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def test_a_head_that_never_ends_is_cut_and_others_are_served_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A header line every few seconds held the connection (and its file descriptor)
    for ever: enough of them and the process could accept nothing."""
    async with _serving(monkeypatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        answered = asyncio.ensure_future(reader.read())
        for i in range(20):  # a header line every 0.1 s, never the blank line
            if answered.done():
                break
            if i == 2:
                head = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                assert (await _ask(port, head)).startswith(b"HTTP/1.1 200")
            writer.write(b"x-slow-%d: 1\r\n" % i)
            await asyncio.sleep(0.1)
        assert answered.done()
        assert time.monotonic() - started < 1.5  # cut at 0.5 s, not after 2 s of lines
        assert answered.result().startswith(b"HTTP/1.1 408"), answered.result()
        writer.close()
        # A connection that sends nothing at all is cut the same way.
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(silent_reader.read(), 5)).startswith(b"HTTP/1.1 408")
        silent.close()


async def test_a_head_too_large_is_a_431(monkeypatch: pytest.MonkeyPatch) -> None:
    """httptools took a 15 MiB head (some 140 MiB to parse) and answered 200."""
    async with _serving(monkeypatch) as port:
        big = b"x-big: " + b"a" * (70 * 1024) + b"\r\n"
        answer = await _ask(port, b"GET / HTTP/1.1\r\nhost: x\r\n" + big + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        many = b"".join(b"x-h%d: 1\r\n" % i for i in range(101))
        answer = await _ask(port, b"GET / HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        # Up to the limits, served: 98 headers of 600 bytes (about 58 KiB).
        fine = b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 600) for i in range(98))
        answer = await _ask(
            port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + fine + b"\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]


async def test_a_kept_alive_connection_is_not_cut_between_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The head's clock starts with a request's first byte: a client that waits longer
    than it between two requests (within uvicorn's keep-alive, 5 s) is served."""
    async with _serving(monkeypatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert await reader.readexactly(2) == b"ok"
            await asyncio.sleep(1.0)  # twice the head's timeout
        writer.close()


def test_serve_raises_its_open_file_limit_to_the_hard_one() -> None:
    """A service manager's usual soft limit (1,024 descriptors) let a few hundred slow
    clients or streams stop the process from accepting anything."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, soft)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        limit = raise_open_file_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert limit == now == expected


async def test_a_pipelined_head_waiting_behind_a_slow_request_is_not_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a review: a head pipelined behind a running request cannot be read
    (uvicorn stops reading meanwhile), so its clock ran out, and the 408 cut the first
    request's response."""
    async with _serving(monkeypatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n"
            b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n"
            b"GET /b HTTP/1.1\r\nho"
        )
        await asyncio.sleep(0.3)
        writer.write(b"st: x\r\nconnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert answer.count(b"HTTP/1.1 200") == 3, answer
