"""Live events over SSE: what each stream carries, resume, heartbeats, shutdown."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from tellback_server.domain.events import streams
from tellback_server.domain.events.broker import QUEUE_SIZE, EventBroker
from tellback_server.domain.events.records import EventRecord
from tellback_server.plugins import build_registry
from tests.server.conftest import Api, identity_token, make_settings, serve_app
from tests.server.live import LiveApi, SseEvent, SseReader, live_app, sse

CLIENT_EVENTS = "/v1/client/events"
AGENT_EVENTS = "/v1/agent/events"


@pytest.fixture
async def live(database_url: str, tmp_path: Path) -> AsyncIterator[LiveApi]:
    settings = make_settings(database_url, tmp_path / "data", sse_heartbeat_seconds=0.3)
    async with live_app(settings) as api:
        yield api


async def _reply(api: LiveApi, agent: dict[str, str], conv_id: str, **body: Any) -> dict[str, Any]:
    r = await api.http.post(
        f"/v1/agent/conversations/{conv_id}/messages",
        json={"body": "Thanks, fixed in 2.1", **body},
        headers=agent,
    )
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()
    return data


async def test_user_sees_the_reply_live(live: LiveApi) -> None:
    app = await live.create_app()
    user = await live.user_headers(app)
    _, agent = await live.create_agent(app)
    conv = await live.feedback(user)
    async with sse(live.http, CLIENT_EVENTS, user) as stream:
        reply = await _reply(live, agent, conv["id"])
        got = await stream.events_until("unread.changed")
    by_type = {e.event: e for e in got}
    message = by_type["message.created"]
    assert message.id is not None
    assert message.data["id"] == message.id
    assert message.data["type"] == "message.created"
    assert message.data["data"]["message"]["id"] == reply["id"]
    assert message.data["data"]["message"]["body"] == "Thanks, fixed in 2.1"
    assert "internal" not in message.data["data"]["message"]  # the end user's view
    assert message.data["data"]["conversation"]["unread_count"] == 1
    assert by_type["conversation.updated"].data["data"]["conversation"]["status"] == "pending"
    unread = by_type["unread.changed"].data["data"]
    assert unread == {
        "unread_count": 1,
        "conversation_id": conv["id"],
        "conversation_unread_count": 1,
    }
    ids = [int(e.id or 0) for e in got]
    assert ids == sorted(ids)


async def test_streams_are_scoped_like_the_rest_api(live: LiveApi) -> None:
    app, other_app = await live.create_app(), await live.create_app("Other")
    alice, bob = await live.user_headers(app), await live.user_headers(app)
    _, agent = await live.create_agent(app)
    _, outsider = await live.create_agent(other_app, name="Eve")
    conv = await live.feedback(alice)
    async with (
        sse(live.http, CLIENT_EVENTS, alice) as alice_stream,
        sse(live.http, CLIENT_EVENTS, bob) as bob_stream,
        sse(live.http, AGENT_EVENTS, agent) as agent_stream,
        sse(live.http, AGENT_EVENTS, outsider) as outsider_stream,
    ):
        await _reply(live, agent, conv["id"], body="internal: check logs", internal=True)
        await _reply(live, agent, conv["id"], body="public answer")
        alice_got = await alice_stream.events_until("unread.changed")
        agent_got = [await agent_stream.next(), await agent_stream.next()]
        # Bob and the other app's agent get only heartbeats while this happens.
        await asyncio.sleep(0.5)
        with pytest.raises(TimeoutError):
            await bob_stream.next(wait=0.3)
        with pytest.raises(TimeoutError):
            await outsider_stream.next(wait=0.3)
    bodies = [e.data["data"]["message"]["body"] for e in alice_got if e.event == "message.created"]
    assert bodies == ["public answer"]  # never the internal note
    assert [e.data["data"]["message"]["internal"] for e in agent_got] == [True, False]
    assert bob_stream.comments  # heartbeats did flow
    assert outsider_stream.comments


async def test_agents_hear_about_new_feedback_and_user_replies(live: LiveApi) -> None:
    app = await live.create_app()
    user = await live.user_headers(app)
    _, agent = await live.create_agent(app)
    async with sse(live.http, AGENT_EVENTS, agent) as stream:
        conv = await live.feedback(user, body="Crash on start")
        created = await stream.next()
        r = await live.http.post(
            f"/v1/client/conversations/{conv['id']}/messages",
            json={"body": "Still crashing"},
            headers=user,
        )
        assert r.status_code == 201
        message = await stream.next()
    assert created.event == "conversation.created"
    assert created.data["data"]["conversation"]["id"] == conv["id"]
    assert created.data["data"]["message"]["body"] == "Crash on start"
    assert created.data["data"]["conversation"]["end_user"]["id"]
    assert message.event == "message.created"
    assert message.data["data"]["message"]["body"] == "Still crashing"
    assert message.data["data"]["conversation"]["unread_count"] == 2


async def test_resume_with_last_event_id_replays_what_was_missed(live: LiveApi) -> None:
    app = await live.create_app()
    user = await live.user_headers(app)
    _, agent = await live.create_agent(app)
    conv = await live.feedback(user)
    async with sse(live.http, CLIENT_EVENTS, user) as stream:
        await _reply(live, agent, conv["id"], body="first")
        seen = await stream.events_until("unread.changed")
    last = seen[-1].id
    assert last is not None
    # Offline: two more replies and a status change happen.
    await _reply(live, agent, conv["id"], body="second")
    await _reply(live, agent, conv["id"], body="third")
    resumed = {**user, "Last-Event-ID": last}
    async with sse(live.http, CLIENT_EVENTS, resumed) as stream:
        missed = await _fresh(stream, int(last), 4)
        live_one = await _reply(live, agent, conv["id"], body="fourth")
        after = await stream.events_until("unread.changed")
    assert [e.event for e in missed] == [
        "message.created",
        "unread.changed",
        "message.created",
        "unread.changed",
    ]
    assert [e.data["data"]["message"]["body"] for e in missed if e.event == "message.created"] == [
        "second",
        "third",
    ]
    assert all(int(e.id or 0) > int(last) for e in missed)
    assert after[0].data["data"]["message"]["id"] == live_one["id"]
    # The query parameter works too (clients that cannot set headers).
    async with sse(live.http, CLIENT_EVENTS, user, last_event_id=last) as stream:
        assert (await _fresh(stream, int(last), 1))[0].data["data"]["message"]["body"] == "second"


async def test_an_event_live_and_replayed_carries_the_same_json(live: LiveApi) -> None:
    """Live, a stream gets the event as this process wrote it (the views as they were
    made); on a resume, as read back from the database. Both must be the same JSON,
    text beyond ASCII included."""
    app = await live.create_app()
    user = await live.user_headers(app)
    _, agent = await live.create_agent(app)
    conv = await live.feedback(user)
    async with (
        sse(live.http, CLIENT_EVENTS, user) as client_stream,
        sse(live.http, AGENT_EVENTS, agent) as agent_stream,
    ):
        await _reply(live, agent, conv["id"], body="Ça marche — 修正済み 🚀")
        r = await live.http.post(
            "/v1/client/conversations", json={"body": "Encore un souci ✨"}, headers=user
        )
        assert r.status_code == 201, r.text
        for_user = await client_stream.events_until("conversation.created")
        for_agent = await agent_stream.events_until("conversation.created")
    bodies = [e.data["data"]["message"]["body"] for e in for_user if e.event == "message.created"]
    assert bodies == ["Ça marche — 修正済み 🚀"]
    assert for_agent[-1].data["data"]["message"]["body"] == "Encore un souci ✨"
    for stream_path, headers, seen in (
        (CLIENT_EVENTS, user, for_user),
        (AGENT_EVENTS, agent, for_agent),
    ):
        since = int(seen[0].id or 0) - 1
        async with sse(live.http, stream_path, headers, last_event_id=str(since)) as again:
            replayed = await _fresh(again, since, len(seen))
        assert [(e.id, e.event, e.data) for e in replayed] == [
            (e.id, e.event, e.data) for e in seen
        ]


async def _fresh(stream: SseReader, last: int, n: int) -> list[SseEvent]:
    """The next ``n`` events after ``last``. On PostgreSQL a resume may also resend events
    from just before ``last`` (ids are taken before commit); clients drop those by id."""
    out: list[SseEvent] = []
    while len(out) < n:
        event = await stream.next()
        if int(event.id or 0) > last:
            out.append(event)
    return out


async def test_a_fresh_stream_gets_its_resume_point_before_any_event(live: LiveApi) -> None:
    app = await live.create_app()
    user = await live.user_headers(app)
    _, agent = await live.create_agent(app)
    conv = await live.feedback(user)
    async with sse(live.http, CLIENT_EVENTS, user) as stream:
        with pytest.raises(TimeoutError):
            await stream.next(wait=0.5)
    [start] = stream.bare_ids  # the newest event id when the stream opened
    # The connection dropped before any event; a reply comes meanwhile.
    reply = await _reply(live, agent, conv["id"])
    async with sse(live.http, CLIENT_EVENTS, {**user, "Last-Event-ID": start}) as stream:
        [missed] = await _fresh(stream, int(start), 1)
    assert missed.event == "message.created"
    assert missed.data["data"]["message"]["id"] == reply["id"]


async def test_unknown_or_purged_last_event_id_asks_the_client_to_reload(live: LiveApi) -> None:
    app = await live.create_app()
    user = await live.user_headers(app)
    _, agent = await live.create_agent(app)
    conv = await live.feedback(user)
    async with sse(live.http, CLIENT_EVENTS, {**user, "Last-Event-ID": "999999"}) as stream:
        reset = await stream.next()
    assert reset.event == "reset"
    assert reset.data["data"]["reason"] == "last_event_id_unknown"
    assert stream.bare_ids == []  # (the reset carries the resume point instead)
    # The reset's id is where to resume after reloading: a reply while the client is
    # away arrives when it reconnects with that id.
    reply = await _reply(live, agent, conv["id"])
    assert reset.id is not None
    async with sse(live.http, CLIENT_EVENTS, {**user, "Last-Event-ID": reset.id}) as stream:
        [missed] = await _fresh(stream, int(reset.id), 1)
    assert missed.data["data"]["message"]["id"] == reply["id"]
    for bad in ("abc", "\u00b2", "\u0661"):  # "²" and Arabic-Indic one: str.isdigit() holds
        r = await live.http.get(CLIENT_EVENTS, params={"last_event_id": bad}, headers=user)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["code"] == "bad_request"
    for header in (b"abc", b"\xb2"):  # (the header's bytes are Latin-1: "\xb2" is "²")
        raw = [(k.encode(), v.encode()) for k, v in user.items()] + [(b"last-event-id", header)]
        r = await live.http.get(CLIENT_EVENTS, headers=raw)
        assert r.status_code == 400, (header, r.text)
        assert r.json()["code"] == "bad_request"


async def test_heartbeats_and_credentials(live: LiveApi) -> None:
    app = await live.create_app()
    user = await live.user_headers(app)
    async with sse(live.http, CLIENT_EVENTS, user) as stream:
        with pytest.raises(TimeoutError):
            await stream.next(wait=1.0)
    assert stream.comments[0] == "connected"
    assert stream.comments.count("ping") >= 2
    for headers in ({}, {"Authorization": "Bearer tbs_nope"}):
        r = await live.http.get(CLIENT_EVENTS, headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
    _, agent = await live.create_agent(app)
    r = await live.http.get(CLIENT_EVENTS, headers=agent)
    assert r.status_code == 401


async def test_a_revoked_session_ends_its_stream(
    live: LiveApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "RECHECK_SECONDS", 0.0)
    app = await live.create_app()
    installation = uuid.uuid4().hex
    token = identity_token(app.identity_secret, "user-42", kid=app.identity_kid)
    user = await live.user_headers(app, installation_id=installation, user_token=token)
    async with sse(live.http, CLIENT_EVENTS, user) as stream:
        await asyncio.sleep(0.5)
        await live.session(app, installation_id=installation)  # logout: revokes user-42's
        with pytest.raises(EOFError):
            await stream.next(wait=5)


async def test_an_agents_stream_ends_when_its_token_is_rotated(
    live: LiveApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recheck also asks whether the token the stream was opened with is still the
    agent's: one taken from a lost phone, then rotated, no longer hears of new feedback.
    (Only a disabled agent or changed apps ended it.)"""
    monkeypatch.setattr(streams, "RECHECK_SECONDS", 0.0)
    app = await live.create_app()
    agent_id, agent = await live.create_agent(app)
    async with sse(live.http, AGENT_EVENTS, agent) as stream:
        await asyncio.sleep(0.5)
        r = await live.http.post(f"/v1/admin/agents/{agent_id}/rotate-token", headers=live.admin)
        assert r.status_code == 200, r.text
        with pytest.raises(EOFError):
            await stream.next(wait=5)


async def test_a_disabled_agents_busy_stream_ends_too(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials are checked again every RECHECK_SECONDS whether or not events flow:
    a stream that a new feedback reached every few seconds was never checked (the
    check ran only between heartbeats), and went on after its agent was disabled."""
    monkeypatch.setattr(streams, "RECHECK_SECONDS", 0.5)
    # No heartbeat during the test (20 s): the old code checked only at a heartbeat.
    settings = make_settings(database_url, tmp_path / "data", sse_heartbeat_seconds=20)
    async with live_app(settings) as live:
        await _busy_stream_ends(live)


async def _busy_stream_ends(live: LiveApi) -> None:
    app = await live.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
    user = await live.user_headers(app)
    agent_id, agent = await live.create_agent(app)
    async with sse(live.http, AGENT_EVENTS, agent) as stream:
        await live.feedback(user)
        assert (await stream.next(wait=5)).event == "conversation.created"
        r = await live.http.patch(
            f"/v1/admin/agents/{agent_id}", json={"disabled": True}, headers=live.admin
        )
        assert r.status_code == 200, r.text
        got, ended = 0, False
        for _ in range(40):  # an event every 0.1 s or so
            await live.feedback(user)
            await asyncio.sleep(0.05)
            try:
                event = await stream.next(wait=5)
            except EOFError:
                ended = True
                break
            assert event.event == "conversation.created"
            got += 1
        assert stream.comments == ["connected"]  # no heartbeat: the old code's only check
    assert ended, "the stream outlived its agent"
    # What arrived before the check came round (its 0.5 s of feedback, ten or so).
    assert got <= 20, got


async def test_an_idempotent_replay_emits_nothing_twice(live: LiveApi) -> None:
    app = await live.create_app()
    user = await live.user_headers(app)
    _, agent = await live.create_agent(app)
    conv = await live.feedback(user)
    key = {**agent, "Idempotency-Key": uuid.uuid4().hex}
    async with sse(live.http, CLIENT_EVENTS, user) as stream:
        await _reply(live, key, conv["id"])
        await _reply(live, key, conv["id"])
        await _reply(live, agent, conv["id"], body="next")
        got = [await stream.next() for _ in range(5)]
    bodies = [e.data["data"]["message"]["body"] for e in got if e.event == "message.created"]
    assert bodies == ["Thanks, fixed in 2.1", "next"]


@asynccontextmanager
async def _two_processes(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[Api, Api]]:
    """PostgreSQL: two server processes (apps) on one database, a writer and a holder."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite runs one server process (its streams are in-process)")
    settings = make_settings(database_url, tmp_path / "data")
    async with (
        serve_app(settings, build_registry()) as writer,
        serve_app(settings, build_registry()) as holder,
    ):
        yield writer, holder


async def test_events_reach_streams_held_by_another_process(
    database_url: str, tmp_path: Path
) -> None:
    """PostgreSQL: what one server process commits reaches the streams another holds
    (NOTIFY, then the record read back), the agents' stream too."""
    async with _two_processes(database_url, tmp_path) as (writer, holder):
        app = await writer.create_app()
        user = await writer.user_headers(app)
        agent_id, agent = await writer.create_agent(app)
        me = (await writer.http.get("/v1/client/me", headers=user)).json()
        events = holder.state.events
        mine = events.subscribe_client(uuid.UUID(app.id), uuid.UUID(me["id"]))
        agents = events.subscribe_agent(uuid.UUID(agent_id), frozenset({uuid.UUID(app.id)}))
        try:
            conv = await writer.feedback(user)  # one event: conversation.created
            r = await writer.http.post(
                f"/v1/agent/conversations/{conv['id']}/messages",
                json={"body": "Fixed"},
                headers=agent,
            )
            assert r.status_code == 201, r.text
            seen = [await asyncio.wait_for(mine.queue.get(), 5) for _ in range(4)]
            heard = await asyncio.wait_for(agents.queue.get(), 5)
        finally:
            events.unsubscribe(mine)
            events.unsubscribe(agents)
    assert [e.type for e in seen if e is not None] == [
        "conversation.created",
        "message.created",
        "conversation.updated",
        "unread.changed",
    ]
    assert heard is not None
    assert heard.type == "conversation.created"
    assert heard.conversation_id == uuid.UUID(conv["id"])


async def test_a_process_reads_back_only_events_its_streams_may_want(
    database_url: str, tmp_path: Path
) -> None:
    """PostgreSQL: another process's NOTIFY is ignored while no stream here may want its
    events (none open, or only other users' and other apps'); the rest are read and
    handed out. N processes would otherwise each read every event back."""
    async with _two_processes(database_url, tmp_path) as (writer, holder):
        reads: list[str] = []

        def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if "FROM events" in statement:
                reads.append(statement)

        async def quiet() -> list[str]:
            await asyncio.sleep(0.5)  # the NOTIFYs have long arrived
            return reads

        engine = holder.state.db.engine.sync_engine
        event.listen(engine, "before_cursor_execute", note)
        events = holder.state.events
        try:
            app, other_app = await writer.create_app(), await writer.create_app("Other")
            alice, bob = await writer.user_headers(app), await writer.user_headers(app)
            carol = await writer.user_headers(other_app)
            agent_id, _ = await writer.create_agent(other_app)
            alice_id = (await writer.http.get("/v1/client/me", headers=alice)).json()["id"]
            await writer.feedback(alice)
            assert await quiet() == []  # no stream here at all
            mine = events.subscribe_client(uuid.UUID(app.id), uuid.UUID(alice_id))
            await writer.feedback(bob)
            await writer.feedback(carol)
            assert await quiet() == []  # another user's; another app's
            conv = await writer.feedback(alice)
            heard = await asyncio.wait_for(mine.queue.get(), 5)
            agents = events.subscribe_agent(
                uuid.UUID(agent_id), frozenset({uuid.UUID(other_app.id)})
            )
            other = await writer.feedback(carol)
            for_agent = await asyncio.wait_for(agents.queue.get(), 5)
            events.unsubscribe(mine)
            events.unsubscribe(agents)
        finally:
            event.remove(engine, "before_cursor_execute", note)
    assert heard is not None
    assert heard.conversation_id == uuid.UUID(conv["id"])
    assert for_agent is not None
    assert for_agent.conversation_id == uuid.UUID(other["id"])
    assert len(reads) == 2


def test_what_a_notification_names_decides_whether_it_is_read() -> None:
    broker = EventBroker()
    app, user = uuid.uuid4(), uuid.uuid4()
    sub = broker.subscribe_client(app, user)
    assert broker._may_want(f"7/{app}/{user}")
    assert not broker._may_want(f"7/{uuid.uuid4()}/{uuid.uuid4()}")
    assert not broker._may_want(f"7/{app}/")  # an app's event, and no agent stream here
    assert broker._may_want("7")  # a bare id: an older process's notification
    assert broker._may_want("7/not-a-uuid/")
    broker.unsubscribe(sub)


async def test_shutdown_ends_streams_cleanly_and_fast(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path / "data")
    async with live_app(settings) as api:
        app = await api.create_app()
        user = await api.user_headers(app)
        async with sse(api.http, CLIENT_EVENTS, user) as stream:
            await asyncio.sleep(0.2)
            assert api.server is not None
            started = asyncio.get_running_loop().time()
            api.server.should_exit = True
            with pytest.raises(EOFError):
                await stream.next(wait=5)
            assert asyncio.get_running_loop().time() - started < 3


def _record(seq: int, user: uuid.UUID, app: uuid.UUID) -> EventRecord:
    return EventRecord(
        seq, "unread.changed", app, user, None, None, {"n": seq}, dt.datetime.now(dt.UTC)
    )


async def test_a_stream_that_cannot_keep_up_is_ended_not_buffered() -> None:
    broker = EventBroker()
    app, user = uuid.uuid4(), uuid.uuid4()
    slow = broker.subscribe_client(app, user)
    other_app = broker.subscribe_client(uuid.uuid4(), user)
    broker.publish(_record(i, user, app) for i in range(QUEUE_SIZE + 5))
    assert slow.ended
    assert slow.queue.qsize() == 1
    assert slow.queue.get_nowait() is None
    assert other_app.queue.empty()  # same user id, other app: nothing
    broker.unsubscribe(slow)
    broker.unsubscribe(other_app)
    assert broker.subscriptions == 0
