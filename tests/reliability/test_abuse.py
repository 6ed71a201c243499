"""Abuse: floods, oversized and deeply nested bodies, many idempotency keys, slow bodies.

What must hold: clear 4xx/429 problem documents (never a 500 or a crash),
memory bounded, and the server answering a health probe throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tellback_server.db.models.ops import IdempotencyKey
from tellback_server.domain.attachments import controllers as attachment_controllers
from tellback_server.plugins import build_registry
from tests.bench.bench_events import rss_kib
from tests.reliability.harness import Probe, Served, serve
from tests.server.conftest import make_settings
from tests.server.live import LiveApi, live_app

PROBLEM = "application/problem+json"
pytestmark = [pytest.mark.timeout(90)]


@pytest.fixture
async def served(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[Served]:
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    async with serve(make_settings(f"sqlite+aiosqlite:///{db}", tmp_path / "data")) as s:
        yield s


@pytest.fixture
async def live(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[LiveApi]:
    """The app on a fresh SQLite copy behind a real socket (for the health probe)."""
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    settings = make_settings(f"sqlite+aiosqlite:///{db}", tmp_path / "data")
    async with live_app(settings, build_registry()) as served:
        yield served


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, f"{r.status_code} {r.text[:500]}"
    assert r.headers["content-type"].split(";")[0] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    return body


def session_body(app_key: str) -> dict[str, Any]:
    return {"app_key": app_key, "installation_id": str(uuid.uuid4()), "device": {"platform": "ios"}}


# ----- sessions flood from one address ------------------------------------------------------


async def test_session_flood_from_one_address_is_cut_by_the_address_limit(
    served: Served,
) -> None:
    """New sessions per client address (default 300/min, ten-second burst): 429 quickly."""
    api = served.api
    app = await api.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
    statuses: list[int] = []
    async with served.client("203.0.113.7") as flood:
        for _ in range(400):
            r = await flood.post("/v1/client/sessions", json=session_body(app.app_key))
            statuses.append(r.status_code)
            if r.status_code == 429:
                body = assert_problem(r, 429, "rate_limited")
                assert int(r.headers["retry-after"]) >= 1, body
                break
    assert statuses[-1] == 429, f"no 429 after {len(statuses)} sessions"
    assert 40 <= statuses.count(201) <= 70, statuses.count(201)
    assert (await api.http.get("/healthz")).status_code == 200


async def test_ten_thousand_sessions_from_one_address_over_real_sockets(live: LiveApi) -> None:
    """10,000 session requests from one address, 16 at a time, against a live server:
    the address's allowance (a ten-second burst, then 5 a second) is admitted and
    every other request is a 429 with Retry-After, those with a broken body too (the
    limit comes before the body is read); the health probe answers throughout and the
    process's memory stays flat."""
    app = await live.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
    total, concurrency = 10_000, 16
    statuses: dict[int, int] = {}
    problems: list[str] = []
    limits = httpx.Limits(max_connections=concurrency)
    async with (
        httpx.AsyncClient(base_url=live.base_url, limits=limits, timeout=10) as http,
        Probe(live.base_url) as probe,
    ):
        rss_before = rss_kib(os.getpid()) * 1024
        started = time.monotonic()
        for start in range(0, total, concurrency):
            batch = []
            for i in range(start, start + concurrency):
                if i % 100 == 99:  # now and then a broken body
                    batch.append(http.post("/v1/client/sessions", content=b"{broken"))
                else:
                    batch.append(http.post("/v1/client/sessions", json=session_body(app.app_key)))
            for i, r in enumerate(await asyncio.gather(*batch), start):
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 429 and "retry-after" not in r.headers:
                    problems.append(f"{i}: 429 without Retry-After")
                elif r.status_code not in (201, 429, 400):
                    problems.append(f"{i}: {r.status_code} {r.text[:200]}")
                elif r.status_code == 400 and i % 100 != 99:
                    problems.append(f"{i}: 400 for a good body")
        elapsed = time.monotonic() - started
        rss_after = rss_kib(os.getpid()) * 1024
    print(
        f"sessions: {total} from one address in {elapsed:.1f} s: {statuses}; health worst "
        f"{probe.worst * 1000:.0f} ms of {len(probe.latencies or [])}; "
        f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    )
    assert problems == []
    # A burst of 50 (ten seconds' worth), then 5 a second, for good bodies and broken
    # ones alike: a broken body is refused with 400 only within the allowance, since
    # the limit comes before the body is read (the test below shows it at once).
    admitted = statuses.get(201, 0) + statuses.get(400, 0)
    assert 40 <= admitted <= 50 + 5 * elapsed + 5, statuses
    assert probe.failures == 0
    assert probe.worst < 1.0, probe.latencies
    assert rss_after - rss_before < 64 * 2**20


async def test_the_address_limit_comes_before_the_body_is_read(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """Over its limit, an address gets 429 whatever its body: a broken one is not read."""
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    # 6 a minute: after the burst, one every 10 s (longer than this test).
    settings = make_settings(
        f"sqlite+aiosqlite:///{db}", tmp_path / "data", sessions_per_ip_per_minute=6
    )
    async with serve(settings) as s:
        app = await s.api.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
        async with s.client("203.0.113.9") as flood:
            statuses = []
            while 429 not in statuses:  # the burst spent
                r = await flood.post("/v1/client/sessions", json=session_body(app.app_key))
                statuses.append(r.status_code)
                assert len(statuses) <= 5, statuses
            for raw in (b"{broken", b"[" * 100_000, b'{"app_key": 7}', b""):
                r = await flood.post(
                    "/v1/client/sessions",
                    content=raw,
                    headers={"Content-Type": "application/json"},
                )
                assert_problem(r, 429, "rate_limited")


async def test_a_flood_from_many_addresses_hits_the_app_limit(served: Served) -> None:
    """The app's own bucket still bounds the total: 600/min admits about 100, then 429."""
    api = served.api
    app = await api.create_app(rate_limits={"app_per_minute": 600, "user_per_minute": 120})
    statuses: list[int] = []
    async with contextlib.AsyncExitStack() as stack:
        peers = [
            await stack.enter_async_context(served.client(f"198.51.100.{i}")) for i in range(1, 11)
        ]
        for n in range(400):
            r = await peers[n % len(peers)].post(
                "/v1/client/sessions", json=session_body(app.app_key)
            )
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert_problem(r, 429, "rate_limited")
                break
    assert statuses[-1] == 429, f"no 429 after {len(statuses)} sessions"
    assert 80 <= statuses.count(201) <= 130, statuses.count(201)


async def test_session_flood_from_one_address_spares_other_addresses(served: Served) -> None:
    api = served.api
    app = await api.create_app(rate_limits={"app_per_minute": 600, "user_per_minute": 120})
    async with served.client("203.0.113.7") as flood, served.client("198.51.100.20") as other:
        for _ in range(400):
            r = await flood.post("/v1/client/sessions", json=session_body(app.app_key))
            if r.status_code == 429:
                break
        assert r.status_code == 429
        r = await other.post("/v1/client/sessions", json=session_body(app.app_key))
        assert r.status_code == 201, r.text


# ----- oversized bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_bodies_over_one_mib_get_413(served: Served, *, chunked: bool) -> None:
    api = served.api
    app = await api.create_app()
    user = await api.user_headers(app)
    raw = b'{"body": "' + b"x" * (1024 * 1024 + 1) + b'"}'
    headers = {**user, "Content-Type": "application/json"}

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 65536):
            yield raw[i : i + 65536]

    content: Any = stream() if chunked else raw
    for path in ("/v1/client/conversations", "/v1/client/sessions", "/v1/admin/apps"):
        h = {**headers, **api.admin} if "admin" in path else headers
        r = await api.http.post(path, content=content if not chunked else stream(), headers=h)
        assert_problem(r, 413, "payload_too_large")
    r = await api.http.get("/v1/client/conversations", headers=user)
    assert r.json()["items"] == []


async def test_body_just_under_the_limit_is_a_validation_error_not_413(served: Served) -> None:
    api = served.api
    app = await api.create_app()
    user = await api.user_headers(app)
    raw = b'{"body": "' + b"x" * (1024 * 1024 - 64) + b'"}'
    r = await api.http.post(
        "/v1/client/conversations",
        content=raw,
        headers={**user, "Content-Type": "application/json"},
    )
    assert_problem(r, 422, "validation_failed")  # body is at most 10,000 characters


# ----- deeply nested JSON -------------------------------------------------------------------

# msgspec decodes recursively: a body nested ~1,000 deep once answered 500 (RecursionError).


@pytest.mark.parametrize(
    "depth",
    [200, 1_000, 100_000],
)
async def test_deeply_nested_json_is_a_4xx(served: Served, depth: int) -> None:
    api = served.api
    app = await api.create_app()
    user = await api.user_headers(app)
    nested = "[" * depth + "]" * depth
    cases = [
        ("POST", "/v1/client/sessions", f'{{"app_key": {nested}}}'),
        ("POST", "/v1/client/conversations", f'{{"body": "hi", "context": {{"extra": {nested}}}}}'),
        ("POST", "/v1/client/conversations", nested),
        ("PATCH", "/v1/client/me", f'{{"attributes": {{"a": {nested}}}}}'),
    ]
    failures = []
    for method, path, raw in cases:
        r = await api.http.request(
            method, path, content=raw, headers={**user, "Content-Type": "application/json"}
        )
        if r.status_code not in (400, 413, 422):
            failures.append(f"{method} {path}: {r.status_code} {r.json().get('code')}")
        assert r.headers["content-type"].split(";")[0] == PROBLEM
    # The server is unharmed either way.
    assert (await api.http.get("/healthz")).status_code == 200
    assert (await api.http.get("/v1/client/unread", headers=user)).status_code == 200
    assert failures == []


async def test_a_flood_of_oversized_and_nested_bodies_over_real_sockets(live: LiveApi) -> None:
    """192 bodies, 16 at a time, over real sockets: 1 MiB + 1 with a Content-Length,
    the same chunked, and JSON nested 100,000 deep. Each is a 4xx problem document;
    the health probe answers throughout and the process's memory stays bounded (the
    bodies are refused at the limit, not held)."""
    app = await live.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
    user = await live.user_headers(app)
    headers = {**user, "Content-Type": "application/json"}
    big = b'{"body": "' + b"x" * (1024 * 1024 + 1) + b'"}'
    nested = b'{"body": "hi", "context": {"extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    def body(i: int) -> Any:
        return (big, chunks(), nested)[i % 3]

    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=16)
    async with (
        httpx.AsyncClient(base_url=live.base_url, limits=limits, timeout=30) as http,
        Probe(live.base_url) as probe,
    ):
        rss_before = rss_kib(os.getpid()) * 1024
        for start in range(0, 192, 16):
            answers = await asyncio.gather(
                *(
                    http.post("/v1/client/conversations", content=body(i), headers=headers)
                    for i in range(start, start + 16)
                )
            )
            for r in answers:
                assert r.headers["content-type"].split(";")[0] == PROBLEM, r.text[:200]
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        rss_after = rss_kib(os.getpid()) * 1024
    print(
        f"bodies: 192 oversized or nested, 16 at a time: {statuses}; health worst "
        f"{probe.worst * 1000:.0f} ms; RSS {rss_before / 2**20:.0f} -> "
        f"{rss_after / 2**20:.0f} MiB"
    )
    assert statuses == {413: 128, 400: 64}
    assert probe.failures == 0
    # (Each nested body holds the loop for the few ms msgspec takes to refuse it;
    # 223 ms at worst here when idle, 350 ms with two CPU hogs beside it.)
    assert probe.worst < 2.0, probe.latencies
    assert rss_after - rss_before < 64 * 2**20
    r = await live.http.get("/v1/client/conversations", headers=user)
    assert r.json()["items"] == []


# ----- many idempotency keys ----------------------------------------------------------------


async def test_many_idempotency_keys_are_rows_not_memory(served: Served) -> None:
    """10,000 feedback creates under distinct keys: each key is a database row, and the
    Python heap does not grow with the number of keys."""
    api = served.api
    app = await api.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
    user = await api.user_headers(app)
    total, concurrency, warm_at = 10_000, 8, 1_000
    body = {"body": "The app crashes on the checkout screen", "tags": ["checkout"]}

    first: dict[str, Any] = {}

    async def one(i: int) -> None:
        headers = {**user, "Idempotency-Key": f"k{i:05d}-{uuid.uuid4().hex}"}
        r = await api.http.post("/v1/client/conversations", json=body, headers=headers)
        assert r.status_code == 201, r.text
        if i == 0:
            first.update(key=headers["Idempotency-Key"], answer=r.json())

    def live_objects() -> int:
        gc.collect()
        return len(gc.get_objects())

    warm = 0
    for start in range(0, total, concurrency):
        await asyncio.gather(*(one(i) for i in range(start, start + concurrency)))
        if start == warm_at:
            warm = live_objects()
    end = live_objects()
    async with api.state.db.session(write=False) as db:
        rows = await db.scalar(select(func.count()).select_from(IdempotencyKey))
    assert rows == total
    per_key = (end - warm) / (total - warm_at)
    print(f"idempotency: {rows} key rows; {per_key:.2f} live objects per key after warm-up")
    assert per_key < 0.5, f"{per_key:.2f} live Python objects per key: keys are held in memory"
    # The first key, 9,999 keys later, still answers from its row: the first answer.
    r = await api.http.post(
        "/v1/client/conversations", json=body, headers={**user, "Idempotency-Key": first["key"]}
    )
    assert r.status_code == 201, r.text
    assert r.headers.get("idempotent-replayed") == "true"
    assert r.json() == first["answer"]


# ----- slow bodies against the local upload endpoint ----------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_slow_upload_bodies_do_not_stall_the_server(
    live: LiveApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 connections trickle an upload body one byte every 0.5 s (slowloris), each byte
    resetting the idle clock. The body's minimum rate (here after a 2 s grace period,
    60 s in production) cuts every one with 408; meanwhile the health probe and normal
    API calls keep answering, and afterwards no socket or file is left open.
    """
    monkeypatch.setattr(attachment_controllers, "UPLOAD_GRACE_SECONDS", 2.0)
    api = live
    app = await api.create_app()
    user = await api.user_headers(app)
    r = await api.http.post(
        "/v1/client/uploads",
        json={
            "filename": "big.txt",
            "content_type": "text/plain",
            "size": 4096,
            "kind": "file",
        },
        headers=user,
    )
    assert r.status_code == 201, r.text
    url = httpx.URL(r.json()["single"]["url"].replace("http://127.0.0.1:8080", live.base_url))
    host, port = "127.0.0.1", int(live.base_url.rsplit(":", 1)[1])
    target = url.raw_path.decode()
    await api.http.get("/healthz")  # (the client's own connection open before counting)
    fds_before = _open_fds()
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    async with Probe(live.base_url) as probe:
        for _ in range(60):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"PUT {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Type: text/plain\r\nContent-Length: 4096\r\n\r\n".encode()
            )
            await writer.drain()
            writers.append(writer)
            readers.append(reader)
        started = time.monotonic()
        while time.monotonic() - started < 6:
            for writer in writers:
                if not writer.is_closing():
                    with contextlib.suppress(ConnectionError):
                        writer.write(b"x")
            await asyncio.sleep(0.5)
            r = await api.http.get("/v1/client/unread", headers=user, timeout=2)
            assert r.status_code == 200
        fds_during = _open_fds()
        answers = [await asyncio.wait_for(reader.read(200), 5) for reader in readers]
    for writer in writers:
        writer.close()
    cut = sum(1 for a in answers if a.startswith(b"HTTP/1.1 408"))
    await asyncio.sleep(0.5)  # the server's side of each socket closes
    fds_after = _open_fds()
    print(
        f"slowloris: {len(writers)} slow PUTs for 6 s; cut by the server with 408: {cut}; "
        f"health worst {probe.worst * 1000:.0f} ms, failures {probe.failures}; "
        f"fds in this process (client and server) +{fds_during - fds_before} during, "
        f"+{fds_after - fds_before} after"
    )
    assert cut == len(writers), answers[:3]
    assert fds_after - fds_before <= 2
    assert probe.failures == 0
    assert probe.worst < 1.0, probe.latencies
