"""Caps on live event streams: per end user and per agent (a new stream ends the
holder's oldest), per client address (429) and per process (503)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tellback_sdk._core import ClientCore
from tellback_sdk._retry import RetryPolicy
from tellback_sdk._sse import StreamState
from tellback_server.domain.events.broker import EventBroker
from tellback_server.jobs.registry import JobRegistry
from tests.server.conftest import make_settings, serve_app
from tests.server.live import LiveApi, SseReader, live_app, sse

CLIENT_EVENTS = "/v1/client/events"
AGENT_EVENTS = "/v1/agent/events"


@pytest.fixture
async def live(database_url: str, tmp_path: Path) -> AsyncIterator[LiveApi]:
    settings = make_settings(database_url, tmp_path / "data", sse_heartbeat_seconds=0.3)
    async with live_app(settings) as api:
        yield api


def _lines(reader: SseReader) -> AsyncIterator[str]:
    """The reader's own line iterator (a response streams once), shared with its next()."""
    if reader._lines is None:
        reader._lines = reader.response.aiter_lines()
    return reader._lines


async def _rest_of(reader: SseReader, wait: float = 5.0) -> list[str]:
    """Every line the stream sends until the server ends it."""
    lines = _lines(reader)

    async def read() -> list[str]:
        return [line async for line in lines]

    return await asyncio.wait_for(read(), wait)


async def _still_open(reader: SseReader) -> bool:
    """Heartbeats come every 0.3 s on an open stream; one that ended has none to give."""
    lines = _lines(reader)

    async def ping() -> bool:
        async for line in lines:
            if line == ": ping":
                return True
        return False

    return await asyncio.wait_for(ping(), 5)


@contextlib.asynccontextmanager
async def _attempt(
    http: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> AsyncIterator[httpx.Response]:
    async with http.stream("GET", path, headers=headers, timeout=10) as response:
        if response.status_code != 200:
            await response.aread()
        yield response


def _capped(metrics: str, stream: str, action: str, cap: str) -> float:
    labels = f'action="{action}",cap="{cap}",stream="{stream}"'
    prefix = f"tellback_sse_streams_capped_total{{{labels}}}"
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _sdk_wait_after(lines: list[str], tmp_path: Path) -> float:
    """The Python SDK's wait before it reconnects, had it read ``lines`` and then the end."""
    core = ClientCore(
        base_url="http://x",
        app_key="tbk_x",
        data_dir=tmp_path / "sdk",
        device=None,
        max_retries=4,
        retry_policy=None,
    )
    try:
        state = StreamState(core, None, reconnect=True, read_timeout=45, uniform=lambda a, b: a)
        state.bind("u")
        state.on_open()
        for line in lines:
            state.feed(line)
        return state.delay(None, {}, RetryPolicy())
    finally:
        core.store.close()


async def test_a_users_sixth_stream_ends_their_oldest_which_waits_before_coming_back(
    live: LiveApi, tmp_path: Path
) -> None:
    app = await live.create_app()
    user, other = await live.user_headers(app), await live.user_headers(app)
    _, agent = await live.create_agent(app)
    conv = await live.feedback(user)
    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(sse(live.http, CLIENT_EVENTS, user)) for _ in range(5)
        ]
        bystander = await stack.enter_async_context(sse(live.http, CLIENT_EVENTS, other))
        # A sixth (a new device, or a reconnect before the server saw the old one drop)
        # is never refused: the oldest makes room.
        newest = await stack.enter_async_context(sse(live.http, CLIENT_EVENTS, user))
        tail = await _rest_of(streams[0])
        assert tail[-1] == ""  # a clean end: the last block is complete
        assert "retry: 30000" in tail
        assert any(line.startswith(": superseded") for line in tail)
        # The SDK waits the 30 s it was told (jitter at its low end) rather than 2 s,
        # so two instances that both still run do not knock each other off in a loop.
        assert _sdk_wait_after(tail, tmp_path) >= 22.5
        for reader in (*streams[1:], bystander):
            assert await _still_open(reader)
        r = await live.http.post(
            f"/v1/agent/conversations/{conv['id']}/messages",
            json={"body": "On it"},
            headers=agent,
        )
        assert r.status_code == 201, r.text
        for reader in (newest, *streams[1:]):
            got = await reader.events_until("unread.changed")
            assert any(e.event == "message.created" for e in got)
    metrics = (await live.http.get("/metrics")).text
    assert _capped(metrics, "client", "ended", "end_user") == 1


async def test_an_agents_eleventh_stream_ends_its_oldest(live: LiveApi) -> None:
    app = await live.create_app()
    _, agent = await live.create_agent(app)
    _, colleague = await live.create_agent(app, name="Grace")
    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(sse(live.http, AGENT_EVENTS, agent)) for _ in range(10)
        ]
        other = await stack.enter_async_context(sse(live.http, AGENT_EVENTS, colleague))
        newest = await stack.enter_async_context(sse(live.http, AGENT_EVENTS, agent))
        tail = await _rest_of(streams[0])
        assert "retry: 30000" in tail
        assert await _still_open(streams[1])
        assert await _still_open(newest)
        assert await _still_open(other)
    metrics = (await live.http.get("/metrics")).text
    assert _capped(metrics, "agent", "ended", "agent") == 1


async def test_client_streams_past_the_address_cap_are_refused_with_429(live: LiveApi) -> None:
    live.state.events.max_per_address = 3
    app = await live.create_app()
    users = [await live.user_headers(app) for _ in range(4)]
    _, agent = await live.create_agent(app)
    async with contextlib.AsyncExitStack() as stack:
        held = [
            await stack.enter_async_context(sse(live.http, CLIENT_EVENTS, u)) for u in users[:3]
        ]
        async with _attempt(live.http, CLIENT_EVENTS, users[3]) as refused:
            assert refused.status_code == 429
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert refused.json()["code"] == "rate_limited"
            assert int(refused.headers["Retry-After"]) > 0
        # Nobody else's stream was ended to make room, and agents are not held to it.
        for reader in held:
            assert await _still_open(reader)
        async with sse(live.http, AGENT_EVENTS, agent) as agent_stream:
            assert await _still_open(agent_stream)
        # A user at the address's cap who replaces their own stream is not refused.
        live.state.events.max_per_user = 1
        replacement = await stack.enter_async_context(sse(live.http, CLIENT_EVENTS, users[0]))
        assert "retry: 30000" in await _rest_of(held[0])
        assert await _still_open(replacement)
    metrics = (await live.http.get("/metrics")).text
    assert _capped(metrics, "client", "refused", "address") == 1


async def test_streams_past_the_process_cap_are_refused_with_503(live: LiveApi) -> None:
    live.state.events.max_streams = 3
    app = await live.create_app()
    users = [await live.user_headers(app) for _ in range(4)]
    _, agent = await live.create_agent(app)
    async with contextlib.AsyncExitStack() as stack:
        for u in users[:3]:
            await stack.enter_async_context(sse(live.http, CLIENT_EVENTS, u))
        for path, headers in ((CLIENT_EVENTS, users[3]), (AGENT_EVENTS, agent)):
            async with _attempt(live.http, path, headers) as refused:
                assert refused.status_code == 503
                assert refused.json()["code"] == "service_unavailable"
                assert int(refused.headers["Retry-After"]) > 0
        # The process still answers everything else.
        assert (await live.http.get("/healthz")).status_code == 200
        assert (await live.http.get("/readyz")).status_code == 200
        await live.session(app)
    # Once streams close, new ones open again.
    async with sse(live.http, CLIENT_EVENTS, users[3]) as reader:
        assert await _still_open(reader)
    metrics = (await live.http.get("/metrics")).text
    assert _capped(metrics, "client", "refused", "process") == 1
    assert _capped(metrics, "agent", "refused", "process") == 1


def test_the_process_cap_leaves_half_the_descriptors_to_everything_else() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1000, hard))
        assert EventBroker().max_streams == 500
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= 10_000:
        assert EventBroker().max_streams == 5000


async def test_a_stream_dropped_before_its_first_byte_is_not_counted_for_ever(
    database_url: str, tmp_path: Path
) -> None:
    """The subscription was released by the stream's own `finally`, which a client
    gone before the response started never reached (the generator never ran): it
    stayed counted, and enough of them would have held the caps shut."""
    import gc
    import uuid

    from tellback_server.domain.events.controllers import _open

    async with serve_app(make_settings(database_url, tmp_path / "data"), JobRegistry()) as api:
        broker = api.state.events
        before = broker.subscriptions
        sub = broker.subscribe_client(uuid.uuid4(), uuid.uuid4(), "203.0.113.9")

        async def valid() -> bool:
            return True

        response = await _open(api.state, sub, None, None, valid)
        assert broker.subscriptions == before + 1
        del response
        gc.collect()
        assert broker.subscriptions == before
        broker.unsubscribe(sub)  # the stream's own end, had it run: counted once
        assert broker.subscriptions == before
