"""A stop signal that arrives twice at once still stops the server gracefully.

`uv run tellback serve` under a process manager that signals the whole process
group (systemd's default `KillMode=control-group`, `timeout`, a terminal's
Ctrl-C) delivers SIGTERM twice within milliseconds: once directly, once
forwarded by `uv`. The second used to force the exit, and a request still
receiving its body got a 500 and was not stored.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.test_quickstart import Server, base_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def send_slowly(port: int, token: str, body: bytes) -> socket.socket:
    """A request whose headers and first half of body are sent; the rest is not yet."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = (
        f"POST /v1/admin/apps HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    conn.sendall(head + body[: len(body) // 2])
    return conn


def answer(conn: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_delivered_twice_at_once_lets_a_request_finish(
    tmp_path: Path, sig: signal.Signals
) -> None:
    server = Server(tmp_path, base_env())
    try:
        server.wait_ready()
        assert server.proc.stdout is not None
        token = server.proc.stdout.readline().strip()  # printed once, at first start
        assert token.startswith("tba_"), token
        body = json.dumps({"name": "In flight"}).encode()
        conn = send_slowly(server.port, token, body)
        time.sleep(0.3)  # the server is reading the body
        server.proc.send_signal(sig)
        time.sleep(0.1)  # (two at the same instant would be handled as one)
        server.proc.send_signal(sig)  # the same stop, forwarded by a parent
        time.sleep(1.5)
        assert server.proc.poll() is None, "the server stopped before the request ended"
        conn.sendall(body[len(body) // 2 :])
        status, content = answer(conn)
        assert status == 201, content
        assert json.loads(content)["name"] == "In flight"
        assert server.proc.wait(timeout=15) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.communicate()


def test_a_second_stop_signal_later_forces_the_exit(tmp_path: Path) -> None:
    """An operator who means it: the second signal, a while after the first, ends the
    process without waiting for a request that never ends."""
    server = Server(tmp_path, base_env())
    try:
        server.wait_ready()
        assert server.proc.stdout is not None
        token = server.proc.stdout.readline().strip()
        conn = send_slowly(server.port, token, json.dumps({"name": "Stuck"}).encode())
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert server.proc.poll() is None  # still waiting for the request
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=10)
        conn.close()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.communicate()
