"""One SSE stream: replay what the client missed, then live events and heartbeats.

The stream subscribes to the broker *before* it reads the replay from the
database, so an event committed in between is in one or the other (or both:
the live copy of a replayed event is skipped).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

import msgspec
import structlog
from sqlalchemy import Select, and_, func, or_, select

from tellback_server.db.engine import Database
from tellback_server.db.models import Event
from tellback_server.domain.events.broker import EventBroker, Subscription
from tellback_server.domain.events.records import EVENT_COLUMNS, EventRecord
from tellback_server.http.errors import BadRequest

log = structlog.get_logger("tellback.events")

REPLAY_LIMIT = 1000
# On PostgreSQL ids are taken at insert, not at commit: a transaction that took a
# lower id may commit just after a higher one was streamed. On resume we also
# resend events of this many seconds before the client's last id (clients
# de-duplicate by id); SQLite has one writer, so ids there commit in order.
COMMIT_GRACE = dt.timedelta(seconds=2)
RECHECK_SECONDS = 60.0
RETRY_MS = 2000

Recheck = Callable[[], Awaitable[bool]]


def parse_last_event_id(raw: str | None) -> int | None:
    if raw is None or not raw.strip():
        return None
    value = raw.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 18:  # ("²" is a digit)
        raise BadRequest("Last-Event-ID must be the id of an event from this stream")
    return int(value)


_encode = msgspec.json.Encoder().encode


def frame(record: EventRecord, *, client: bool) -> bytes:
    data = _encode(record.envelope(client=client))  # (its data may be a view's Struct)
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (record.id, record.type.encode(), data)


def _reset_frame(reason: str, resume_id: int) -> bytes:
    # The client should reload what it shows, then carry on live; its old position is
    # useless, so the reset carries the new one (the newest event id when it opened).
    data = json.dumps({"type": "reset", "data": {"reason": reason}})
    return f"id: {resume_id}\nevent: reset\ndata: {data}\n\n".encode()


async def replay(
    db: Database, scope: Select[tuple[int]], last_id: int
) -> tuple[list[EventRecord], str | None]:
    """Events in ``scope`` after ``last_id``; or a reason the client must reload instead."""
    async with db.session(write=False) as session:
        after = Event.id > last_id
        if last_id > 0:  # 0: the head of an empty log, handed out on connect
            last_at = await session.scalar(select(Event.created_at).where(Event.id == last_id))
            if last_at is None:
                return [], "last_event_id_unknown"  # purged (older than retention) or foreign
            if not db.is_sqlite:
                grace = and_(Event.id < last_id, Event.created_at >= last_at - COMMIT_GRACE)
                after = or_(after, grace)
        ids = scope.where(after).order_by(Event.id).limit(REPLAY_LIMIT + 1).subquery()
        rows = (
            await session.execute(select(*EVENT_COLUMNS).where(Event.id.in_(select(ids.c.id))))
        ).all()
    if len(rows) > REPLAY_LIMIT:
        return [], "too_many_missed_events"
    return sorted((EventRecord.from_row(r) for r in rows), key=lambda r: r.id), None


def client_scope(app_id: UUID, end_user_id: UUID) -> Select[tuple[int]]:
    return select(Event.id).where(
        Event.end_user_id == end_user_id,
        Event.app_id == app_id,
        Event.client_data.is_not(None),
    )


def agent_scope(app_ids: frozenset[UUID]) -> Select[tuple[int]]:
    return select(Event.id).where(Event.app_id.in_(app_ids), Event.data.is_not(None))


async def head(db: Database) -> int:
    """The newest event id: a fresh stream's resume point, before any event arrives."""
    async with db.session(write=False) as session:
        return int(await session.scalar(select(func.max(Event.id))) or 0)


async def stream(
    broker: EventBroker,
    sub: Subscription,
    backlog: list[EventRecord],
    reset: str | None,
    *,
    start_id: int | None,
    heartbeat_s: float,
    recheck: Recheck,
) -> AsyncIterator[bytes]:
    try:
        # An id-only block gives a fresh client its resume point at once (EventSource
        # keeps it as lastEventId), so a drop before the first event loses nothing; a
        # reset carries it instead.
        start = f"id: {start_id}\n" if start_id is not None and reset is None else ""
        yield f"retry: {RETRY_MS}\n{start}: connected\n\n".encode()
        if reset is not None:
            assert start_id is not None
            yield _reset_frame(reset, start_id)
        sent = {r.id for r in backlog}
        for record in backlog:
            yield frame(record, client=sub.client)
        loop = asyncio.get_running_loop()
        next_check = loop.time() + RECHECK_SECONDS
        while True:
            # Before whatever comes next, a busy stream's as an idle one's: a stream
            # that an event reaches every few seconds must end with its credentials too.
            if loop.time() >= next_check:
                next_check = loop.time() + RECHECK_SECONDS
                if not await recheck():
                    log.info("events.stream_revoked", client=sub.client)
                    return
            try:
                live = await asyncio.wait_for(sub.queue.get(), heartbeat_s)
            except TimeoutError:
                yield b": ping\n\n"
                continue
            if live is None:
                if sub.farewell is not None:
                    yield sub.farewell
                return
            if live.id in sent:
                sent.discard(live.id)
                continue
            yield frame(live, client=sub.client)
    finally:
        broker.unsubscribe(sub)
