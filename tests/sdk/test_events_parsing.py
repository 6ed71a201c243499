"""The event stream's pure parts: SSE grammar, typed parsing, resume bookkeeping, backoff,
and the connect loop's 401 handling against a mock server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tellback_sdk import (
    AttachmentUpdated,
    AuthenticationError,
    BadRequestError,
    Client,
    ConversationCreated,
    MessageCreated,
    Reset,
    RetryPolicy,
    UnknownEvent,
    UnreadChanged,
    parse_event,
)
from tellback_sdk._core import ClientCore
from tellback_sdk._sse import SSEDecoder, StreamState
from tellback_sdk.cli import describe

CONV = {
    "id": "c1",
    "status": "open",
    "created_at": "2025-01-01T10:00:00Z",
    "updated_at": "2025-01-01T10:00:00Z",
}
MSG = {
    "id": "m1",
    "conversation_id": "c1",
    "author": {"type": "agent", "name": "Ada"},
    "body": "hi",
    "created_at": "2025-01-01T10:00:00Z",
}


def frame(id_: int, type_: str, data: dict[str, Any]) -> list[str]:
    envelope = {"id": str(id_), "type": type_, "timestamp": "2025-01-01T10:00:00Z", "data": data}
    return [f"id: {id_}", f"event: {type_}", f"data: {json.dumps(envelope)}", ""]


def unread(id_: int) -> list[str]:
    data = {"unread_count": id_, "conversation_id": "c1", "conversation_unread_count": 1}
    return frame(id_, "unread.changed", data)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ClientCore]:
    c = ClientCore(
        base_url="http://x",
        app_key="tbk_x",
        data_dir=tmp_path,
        device=None,
        max_retries=4,
        retry_policy=None,
    )
    yield c
    c.store.close()


def feed(state: StreamState, lines: list[str]) -> list[Any]:
    return [e for line in lines if (e := state.feed(line)) is not None]


def test_parse_known_types_and_tolerate_unknown_ones() -> None:
    created = parse_event(
        json.dumps(
            {
                "id": "3",
                "type": "conversation.created",
                "timestamp": "2025-01-01T10:00:00Z",
                "data": {"conversation": CONV, "message": MSG, "new": 1},
            }
        )
    )
    assert isinstance(created, ConversationCreated)
    assert (created.conversation.id, created.message.author.name) == ("c1", "Ada")
    future = parse_event(
        json.dumps(
            {
                "id": "4",
                "type": "agent.typing",
                "timestamp": "2025-01-01T10:00:00Z",
                "data": {"agent": "Ada"},
            }
        )
    )
    assert isinstance(future, UnknownEvent)
    assert (future.id, future.type, future.data) == ("4", "agent.typing", {"agent": "Ada"})
    # A known type whose shape changed does not kill the stream either.
    odd = parse_event(json.dumps({"id": "5", "type": "message.created", "data": {"x": 1}}))
    assert isinstance(odd, UnknownEvent)
    assert odd.type == "message.created"
    reset = parse_event('{"type":"reset","data":{"reason":"too_many_missed_events"}}')
    assert isinstance(reset, Reset)
    assert (reset.id, reset.reason) == (None, "too_many_missed_events")
    with pytest.raises(ValueError, match="JSON"):
        parse_event("not json")


def test_sse_grammar() -> None:
    d = SSEDecoder()
    lines = ["retry: 1500", ": connected", "", "id: 7", "event: x", "data: a", "data:b", ""]
    out = [e for line in lines if (e := d.feed(line)) is not None]
    assert d.retry_ms == 1500
    assert len(out) == 1
    assert (out[0].id, out[0].event, out[0].data) == ("7", "x", "a\nb")
    assert d.feed("id: 8") is None
    bare = d.feed("")  # no data: not an event, but the server's resume point
    assert bare is not None
    assert (bare.id, bare.data) == ("8", "")
    assert d.feed("") is None  # an empty block is nothing


def test_an_id_only_block_is_a_resume_point_not_an_event(core: ClientCore) -> None:
    state = StreamState(core, None, reconnect=True, read_timeout=45)
    state.bind("u")
    state.on_open()
    assert feed(state, ["retry: 2000", "id: 41", ": connected", ""]) == []
    assert state.last_id == 41
    assert (state.request().headers or {}).get("Last-Event-ID") == "41"
    state.on_open()  # a reconnect now resumes from 41: no reset needed
    assert not state.pending


def test_dedupe_max_id_and_persistence(core: ClientCore) -> None:
    state = StreamState(core, None, reconnect=True, read_timeout=45)
    state.bind("user-1")
    got = feed(state, unread(5) + unread(7) + unread(7) + unread(6) + [": ping", ""])
    assert [e.id for e in got] == ["5", "7", "6"]  # 6 committed late: new, so handed over
    assert state.last_id == 7  # never moved backwards
    assert state.request().headers == {
        "Accept": "text/event-stream",
        "Cache-Control": "no-cache",
        "Last-Event-ID": "7",
    }
    # Another stream (an app restart) resumes from the saved position and still knows
    # which ids it handed over.
    again = StreamState(core, None, reconnect=True, read_timeout=45)
    again.bind("user-1")
    assert again.last_id == 7
    assert feed(again, unread(6) + unread(8))[0].id == "8"
    older = StreamState(core, "2", reconnect=True, read_timeout=45)  # an explicit replay
    older.bind("user-1")
    feed(older, unread(3))
    assert core.store.get(older.key or "")["last"] == 8  # the saved position never regresses
    other_user = StreamState(core, None, reconnect=True, read_timeout=45)
    other_user.bind("user-2")
    assert other_user.last_id is None


def test_a_reset_moves_the_position_to_its_id_even_backwards(core: ClientCore) -> None:
    state = StreamState(core, "90", reconnect=True, read_timeout=45)
    state.bind("u")
    state.on_open()
    feed(state, unread(95))
    reset = 'data: {"type":"reset","data":{"reason":"last_event_id_unknown"}}'
    [event] = feed(state, ["id: 40", "event: reset", reset, ""])
    assert isinstance(event, Reset)
    assert state.last_id == 40
    assert core.store.get(state.key or "")["last"] == 40  # (a restored database: lower ids)
    state.on_open()  # reconnects from 40: nothing for the app to reload
    assert not state.pending


def test_reset_forgets_the_position_and_a_blind_reconnect_is_a_reset(core: ClientCore) -> None:
    """A server that sends a reset without an id: live from there, and the next connect
    has no resume point."""
    state = StreamState(core, "9", reconnect=True, read_timeout=45)
    state.bind("u")
    assert state.last_id == 9  # an explicit id wins over the saved one
    state.on_open()
    [reset] = feed(state, ["event: reset", 'data: {"type":"reset","data":{"reason":"x"}}', ""])
    assert isinstance(reset, Reset)
    assert state.last_id is None
    assert core.store.get(state.key or "") is None
    state.on_open()  # reconnected with nothing to resume from: events may be lost
    assert [(type(e), getattr(e, "reason", None)) for e in state.pending] == [
        (Reset, "no_resume_point")
    ]
    with pytest.raises(ValueError, match="decimal"):
        StreamState(core, "abc", reconnect=True, read_timeout=45)


def test_a_user_change_mid_stream_is_a_reset(core: ClientCore) -> None:
    state = StreamState(core, None, reconnect=True, read_timeout=45)
    state.bind("a")
    state.on_open()
    feed(state, unread(3))
    state.bind("b")
    state.on_open()
    assert [(type(e), getattr(e, "reason", None)) for e in state.pending] == [
        (Reset, "user_changed")
    ]
    assert state.last_id is None


def test_backoff_uses_the_servers_retry_doubles_and_is_capped(core: ClientCore) -> None:
    policy = RetryPolicy(cap=30.0, max_retry_after=60.0)
    state = StreamState(core, None, reconnect=True, read_timeout=45, uniform=lambda a, b: 1.0)
    feed(state, ["retry: 3000", ""])
    assert [state.delay(None, {}, policy) for _ in range(5)] == [3.0, 6.0, 12.0, 24.0, 30.0]
    state.on_open()
    assert state.delay(None, {}, policy) == 3.0
    assert state.delay(503, {"Retry-After": "120"}, policy) == 60.0
    assert StreamState.retryable(503)
    assert not StreamState.retryable(403)


def _session(request: httpx.Request) -> httpx.Response:
    body = {"session_token": "tbs_x", "expires_at": "2099-01-01T00:00:00Z", "user": {"id": "u1"}}
    return httpx.Response(201, json=body)


def test_a_401_after_renewal_is_surfaced(tmp_path: Path) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/client/sessions":
            return _session(request)
        return httpx.Response(401, json={"status": 401, "code": "unauthenticated"})

    with (
        Client(
            "http://x", "tbk_x", data_dir=tmp_path, transport=httpx.MockTransport(handler)
        ) as tb,
        pytest.raises(AuthenticationError),
    ):
        next(tb.events.stream())
    assert calls == ["/v1/client/sessions", "/v1/client/events"] * 2


def test_server_close_reconnects_with_the_last_id(tmp_path: Path) -> None:
    """A mock server that ends each stream after one event; then a 503, then a 400."""
    sent: list[str | None] = []
    bodies = iter(
        [
            "retry: 1\n: connected\n\n" + "\n".join(unread(1)) + "\n",
            "retry: 1\n\n" + "\n".join(unread(2)) + "\n" + "\n".join(unread(1)) + "\n",
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/client/sessions":
            return _session(request)
        sent.append(request.headers.get("last-event-id"))
        body = next(bodies, None)
        if body is None:
            if len(sent) == 3:
                return httpx.Response(503, json={"status": 503}, headers={"Retry-After": "0"})
            return httpx.Response(400, json={"status": 400, "code": "bad_request"})
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    fast = RetryPolicy(base=0.001, cap=0.005)
    with Client(
        "http://x",
        "tbk_x",
        data_dir=tmp_path,
        transport=httpx.MockTransport(handler),
        retry_policy=fast,
    ) as tb:
        got: list[str | None] = []

        def drain() -> None:
            for event in tb.events.stream():
                assert isinstance(event, UnreadChanged)
                got.append(event.id)

        with pytest.raises(BadRequestError):
            drain()
    assert got == ["1", "2"]
    assert sent == [None, "1", "2", "2"]


def test_message_created_shortcuts() -> None:
    event = parse_event(
        json.dumps(
            {
                "id": "1",
                "type": "message.created",
                "timestamp": "2025-01-01T10:00:00Z",
                "data": {"conversation": CONV, "message": MSG},
            }
        )
    )
    assert isinstance(event, MessageCreated)
    assert event.message.body == "hi"
    assert event.conversation.status == "open"


def test_attachment_updated_is_typed() -> None:
    """As the server's media job announces a processed photo (no URL in it)."""
    data = {
        "attachment_id": "a1",
        "message_id": "m1",
        "conversation_id": "c1",
        "status": "rejected",
        "reason": "not a photo",
    }
    decoder = SSEDecoder()
    (raw,) = [e for line in frame(9, "attachment.updated", data) if (e := decoder.feed(line))]
    event = parse_event(raw.data, event=raw.event, id=raw.id)
    assert isinstance(event, AttachmentUpdated)
    assert (event.id, event.attachment_id, event.status) == ("9", "a1", "rejected")
    assert (event.data.message_id, event.data.conversation_id) == ("m1", "c1")
    assert event.data.reason == "not a photo"
    assert describe(event) == (
        "attachment.updated #9 conversation=c1 attachment=a1 status=rejected reason=not a photo"
    )


@pytest.mark.parametrize("renewing", [False, True])
def test_a_stream_waits_out_an_outage_that_refuses_sessions(tmp_path: Path, renewing: bool) -> None:
    """During an outage POST /v1/client/sessions answers 503: a reconnecting stream
    waits (as for a failed connect) instead of ending with ServiceUnavailableError,
    whether it needs its first session or must renew one after a 401."""
    calls = {"sessions": 0, "events": 0}
    outage = range(2, 9) if renewing else range(1, 8)  # longer than the retry budget
    body = "\n".join(["retry: 1", *unread(5)]) + "\n"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/client/sessions":
            calls["sessions"] += 1
            if calls["sessions"] in outage:
                return httpx.Response(
                    503,
                    headers={"Retry-After": "0", "Content-Type": "application/problem+json"},
                    json={"status": 503, "code": "service_unavailable", "title": "down"},
                )
            token = f"tbs_{calls['sessions']}"
            user = {"id": "u1", "attributes": {}}
            return httpx.Response(
                201,
                json={"session_token": token, "expires_at": "2099-01-01T00:00:00Z", "user": user},
            )
        calls["events"] += 1
        if renewing and request.headers["Authorization"] == "Bearer tbs_1":  # revoked
            return httpx.Response(401, json={"status": 401, "code": "unauthenticated"})
        return httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"})

    quick = RetryPolicy(max_retries=2, base=0.001, cap=0.002, max_retry_after=0.001)
    with (
        Client(
            "http://tb.test",
            "tbk_x",
            data_dir=tmp_path,
            transport=httpx.MockTransport(handler),
            retry_policy=quick,
        ) as tb,
        tb.events.stream(reconnect=True) as stream,
    ):
        event = next(iter(stream))
    assert isinstance(event, UnreadChanged)
    assert calls["sessions"] == outage.stop
