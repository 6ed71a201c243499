"""Live events through the SDK against the real server on a real socket (SSE needs one:
httpx's ASGI transport buffers whole responses). Async tests run uvicorn in the test's
loop (``live_app``); sync tests use the ``tellback serve`` process."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tellback_sdk import (
    APIConnectionError,
    AsyncClient,
    AsyncEventStream,
    AttachmentUpdated,
    Client,
    ConversationUpdated,
    LiveEvent,
    MessageCreated,
    Reset,
    UnreadChanged,
)
from tests.sdk.conftest import FAST, NO_LIMITS, AsyncFaultTransport, Faults, Live
from tests.server.conftest import AppInfo, make_settings
from tests.server.live import LiveApi, live_app
from tests.server.test_attachments_flow import jpeg_with_gps, run_jobs

EVENTS = "/v1/client/events"


@dataclass
class Stage:
    api: LiveApi
    app: AppInfo
    agent: dict[str, str]

    @property
    def url(self) -> str:
        return self.api.base_url

    async def reply(self, conv_id: str, body: str = "Thanks, fixed in 2.3.2") -> dict[str, Any]:
        r = await self.api.http.post(
            f"/v1/agent/conversations/{conv_id}/messages", json={"body": body}, headers=self.agent
        )
        assert r.status_code == 201, r.text
        data: dict[str, Any] = r.json()
        return data

    async def agent_message_ids(self, conv_id: str) -> set[str]:
        """Server truth: every agent message of the conversation."""
        ids: set[str] = set()
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 10}
            if cursor:
                params["cursor"] = cursor
            r = await self.api.http.get(
                f"/v1/agent/conversations/{conv_id}/messages", params=params, headers=self.agent
            )
            assert r.status_code == 200, r.text
            body = r.json()
            ids |= {m["id"] for m in body["items"] if m["author"]["type"] == "agent"}
            cursor = body["next_cursor"]
            if not cursor:
                return ids


@pytest.fixture
async def stage(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[Stage]:
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    settings = make_settings(
        f"sqlite+aiosqlite:///{db}", tmp_path / "server-data", sse_heartbeat_seconds=0.5
    )
    async with live_app(settings) as api:
        app = await api.create_app("SDK events", rate_limits=NO_LIMITS)
        _, agent = await api.create_agent(app)
        yield Stage(api, app, agent)


def client(stage: Stage, data_dir: Path, **kw: Any) -> AsyncClient:
    return AsyncClient(stage.url, stage.app.app_key, data_dir=data_dir, retry_policy=FAST, **kw)


async def collect(
    events: AsyncEventStream, until: Callable[[LiveEvent], bool], wait: float = 10.0
) -> list[LiveEvent]:
    got: list[LiveEvent] = []
    async with asyncio.timeout(wait):
        async for event in events:
            got.append(event)
            if until(event):
                return got
    return got


def is_unread(event: LiveEvent) -> bool:
    return isinstance(event, UnreadChanged)


async def test_async_stream_gets_the_agent_reply_live_and_typed(
    stage: Stage, tmp_path: Path
) -> None:
    async with client(stage, tmp_path) as tb:
        conv = await tb.conversations.create("The checkout button does nothing")
        async with tb.events.stream() as events:
            await events.connect()
            assert events.connected
            reply = await stage.reply(conv.id, "Merci — corrigé dans 2.3.2 ✅")  # UTF-8 JSON
            got = await collect(events, is_unread)
    by_type = {type(e): e for e in got}
    assert set(by_type) == {MessageCreated, ConversationUpdated, UnreadChanged}
    message = by_type[MessageCreated]
    assert isinstance(message, MessageCreated)
    assert message.message.id == reply["id"]
    assert message.message.author.type == "agent"
    assert message.message.body == "Merci — corrigé dans 2.3.2 ✅"
    assert message.conversation.id == conv.id
    assert message.conversation.unread_count == 1
    updated = by_type[ConversationUpdated]
    assert isinstance(updated, ConversationUpdated)
    assert updated.conversation.status == "pending"
    unread = by_type[UnreadChanged]
    assert isinstance(unread, UnreadChanged)
    assert (unread.unread_count, unread.data.conversation_id) == (1, conv.id)
    assert unread.data.conversation_unread_count == 1
    ids = [int(e.id or 0) for e in got]
    assert ids == sorted(ids)
    assert events.last_event_id == str(ids[-1])
    assert all(e.timestamp is not None and e.timestamp.tzinfo is not None for e in got)


class ToPort(httpx.AsyncHTTPTransport):
    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(port=self.port)
        return await super().handle_async_request(request)


async def test_a_processed_photo_arrives_as_a_typed_attachment_updated(
    stage: Stage, tmp_path: Path
) -> None:
    photo = tmp_path / "shot.jpg"
    photo.write_bytes(jpeg_with_gps())
    # Upload URLs name the settings' address (port 8080); the live server has its own.
    live_port = httpx.URL(stage.url).port or 80
    async with client(stage, tmp_path / "sdk", transport=ToPort(live_port)) as tb:
        conv = await tb.conversations.create("See the photo", attachments=[photo])
        (attachment,) = conv.last_message.attachments if conv.last_message else []
        async with tb.events.stream() as events:
            await events.connect()
            await run_jobs(stage.api)  # the media job: checks, strips, thumbnails
            got = await collect(events, lambda e: isinstance(e, AttachmentUpdated))
        event = got[-1]
        assert isinstance(event, AttachmentUpdated)
        assert (event.attachment_id, event.status, event.data.reason) == (
            attachment.id,
            "ready",
            None,
        )
        assert (event.data.conversation_id, event.data.message_id) == (
            conv.id,
            conv.last_message.id if conv.last_message else None,
        )
        assert (await tb.attachments.get(event.attachment_id)).status == "ready"


def test_sync_stream_gets_the_reply_and_stops_from_another_thread(
    live: Live, tmp_path: Path
) -> None:
    app = live.create_app()
    agent = live.create_agent(app["id"])
    with Client(live.url, app["app_key"], data_dir=tmp_path, retry_policy=FAST) as tb:
        conv = tb.conversations.create("Sync and live")
        events = tb.events.stream()
        events.connect()
        r = httpx.post(
            f"{live.url}/v1/agent/conversations/{conv.id}/messages",
            json={"body": "Hello from Ada"},
            headers=agent,
        )
        assert r.status_code == 201, r.text
        for event in events:
            if isinstance(event, MessageCreated):
                assert event.message.body == "Hello from Ada"
                assert event.message.author.type == "agent"
                reply_id = int(event.id or 0)
                break
        # The rest arrives; then the stream waits (heartbeats only) until closed elsewhere.
        threading.Timer(0.5, events.close).start()
        started = time.monotonic()
        rest = list(events)
        assert time.monotonic() - started < 5
        assert {type(e) for e in rest} == {ConversationUpdated, UnreadChanged}
        assert not events.connected

        # A ``break`` without close(): the stream is freed (no reference cycle) and its
        # connection closed at once.
        def first_of_a_new_stream() -> LiveEvent | None:
            stream = tb.events.stream(str(reply_id - 1))  # replays the reply
            for event in stream:
                return event
            return None

        before = len(tb._http._transport._pool.connections)  # type: ignore[attr-defined]
        replayed = first_of_a_new_stream()
        assert isinstance(replayed, MessageCreated)
        assert replayed.id == str(reply_id)
        assert len(tb._streams) == 0
        assert len(tb._http._transport._pool.connections) <= before  # type: ignore[attr-defined]
        # Closing the client ends a stream that another thread is reading, too.
        other = tb.events.stream()
        other.connect()
        threading.Timer(0.3, tb.close).start()
        started = time.monotonic()
        assert list(other) == []
        assert time.monotonic() - started < 5


# ----- drops, resume, de-duplication -----------------------------------------------------


class CutStream(httpx.AsyncByteStream):
    """Passes ``limit`` chunks, then half of the next one, then a reset connection."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int) -> None:
        self.inner = inner
        self.limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        passed = 0
        async for chunk in self.inner:
            if passed >= self.limit:
                yield chunk[: len(chunk) // 2]
                raise httpx.ReadError("injected: connection reset")
            passed += 1
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class CuttingTransport(httpx.AsyncBaseTransport):
    """Cuts every event stream after a few chunks; records the Last-Event-ID sent."""

    inner: httpx.AsyncBaseTransport = field(default_factory=httpx.AsyncHTTPTransport)
    rng: random.Random = field(default_factory=lambda: random.Random(11))
    resumed_from: list[str | None] = field(default_factory=list)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path != EVENTS or response.status_code != 200:
            return response
        self.resumed_from.append(request.headers.get("last-event-id"))
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=CutStream(response.stream, self.rng.randint(1, 4)),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_drops_mid_stream_lose_nothing_and_repeat_nothing(
    stage: Stage, tmp_path: Path
) -> None:
    cutter = CuttingTransport()
    count = 25
    async with client(stage, tmp_path, transport=cutter) as tb:
        conv = await tb.conversations.create("Many replies, bad network")
        async with tb.events.stream() as events:
            await events.connect()

            async def replies() -> None:
                for i in range(count):
                    await stage.reply(conv.id, f"reply {i}")
                    await asyncio.sleep(0.01)

            sender = asyncio.create_task(replies())
            received: list[str] = []
            async with asyncio.timeout(20):
                async for event in events:
                    if isinstance(event, MessageCreated):
                        received.append(event.message.id)
                        if len(received) == count:
                            break
            await sender
    assert len(received) == len(set(received)), "an event was handed over twice"
    assert set(received) == await stage.agent_message_ids(conv.id)
    assert len(cutter.resumed_from) >= 5, cutter.resumed_from
    ids = [int(i) for i in cutter.resumed_from if i is not None]
    assert ids == sorted(ids), "the resume id moved backwards"


async def test_a_resend_of_seen_ids_is_dropped(stage: Stage, tmp_path: Path) -> None:
    """What PostgreSQL's commit-order grace does: a resume resends ids at or below the
    Last-Event-ID. Here the SDK is made to resume from an older id than it has seen."""
    async with client(stage, tmp_path) as tb:
        conv = await tb.conversations.create("Grace")
        async with tb.events.stream() as events:
            await events.connect()
            await stage.reply(conv.id, "one")
            first = await collect(events, is_unread)
            assert events._state.last_id is not None
            events._state.last_id = int(first[0].id or 0) - 1  # resume "too early"
            await events._drop()  # the connection is lost
            await stage.reply(conv.id, "two")
            second = await collect(events, is_unread)
    seen = [e.id for e in first + second]
    assert len(seen) == len(set(seen))
    bodies = [e.message.body for e in second if isinstance(e, MessageCreated)]
    assert bodies == ["two"]


async def test_unknown_position_is_a_reset_then_live(stage: Stage, tmp_path: Path) -> None:
    async with client(stage, tmp_path) as tb:
        conv = await tb.conversations.create("Reset me")
        async with tb.events.stream(last_event_id="987654") as events:
            first = await collect(events, lambda _e: True)
            assert isinstance(first[0], Reset)
            assert first[0].reason == "last_event_id_unknown"
            assert first[0].id is not None
            assert events.last_event_id == first[0].id  # the reset's position, not the old
            reply = await stage.reply(conv.id)
            got = await collect(events, is_unread)
    [message] = [e for e in got if isinstance(e, MessageCreated)]
    assert message.message.id == reply["id"]
    assert events.last_event_id == got[-1].id


async def test_401_renews_the_session_then_connects(stage: Stage, tmp_path: Path) -> None:
    faults = Faults()
    transport = AsyncFaultTransport(httpx.AsyncHTTPTransport(), faults)
    async with client(stage, tmp_path, transport=transport) as tb:
        conv = await tb.conversations.create("Old session")
        key = tb._core._session_key
        tb._core.store.set(key, {**tb._core.store.get(key), "token": "tbs_revoked"})
        tb._core.session = tb._core._load_session()
        faults.log.clear()
        async with tb.events.stream() as events:
            await events.connect()
            await stage.reply(conv.id)
            got = await collect(events, is_unread)
    assert faults.log == [f"GET {EVENTS}", "POST /v1/client/sessions", f"GET {EVENTS}"]
    assert any(isinstance(e, MessageCreated) for e in got)


async def test_position_survives_a_restart_and_logout_forgets_it(
    stage: Stage, tmp_path: Path
) -> None:
    async with client(stage, tmp_path) as tb:
        conv = await tb.conversations.create("Restart me")
        async with tb.events.stream() as events:
            await events.connect()
            await stage.reply(conv.id, "while running")
            await collect(events, is_unread)
    missed = await stage.reply(conv.id, "while the app was closed")
    async with client(stage, tmp_path) as tb:
        async with tb.events.stream() as events:
            got = await collect(events, lambda e: isinstance(e, MessageCreated))
        assert isinstance(got[-1], MessageCreated)
        assert got[-1].message.id == missed["id"]
        assert not any(isinstance(e, Reset) for e in got)
        saved = tb._core.store.query("SELECT key FROM kv WHERE key LIKE 'events:%'")
        assert len(saved) == 1
        await tb.logout()
        assert tb._core.store.query("SELECT key FROM kv WHERE key LIKE 'events:%'") == []


async def test_closing_the_client_ends_a_stream_read_by_another_task(
    stage: Stage, tmp_path: Path
) -> None:
    tb = client(stage, tmp_path)
    await tb.start()
    got: list[LiveEvent] = []

    async def watch() -> None:
        got.extend([event async for event in tb.events.stream()])

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    assert len(tb._streams) == 1

    async def first_of_a_new_stream() -> LiveEvent | None:
        async for event in tb.events.stream("1"):
            return event
        return None

    assert isinstance(await first_of_a_new_stream(), Reset)  # event 1 is not this user's
    assert len(tb._streams) == 1  # only the watching task's stream is left
    await tb.close()
    await asyncio.wait_for(task, 5)
    assert got == []


async def test_reconnect_false_ends_with_the_connection(stage: Stage, tmp_path: Path) -> None:
    cutter = CuttingTransport()
    cutter.rng = random.Random(1)

    async def drain(events: AsyncEventStream) -> None:
        async with asyncio.timeout(10):
            async for _ in events:
                pass

    async with client(stage, tmp_path, transport=cutter) as tb:
        with pytest.raises(APIConnectionError):
            await drain(tb.events.stream(reconnect=False))
    assert len(cutter.resumed_from) == 1
