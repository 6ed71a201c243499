"""The events broker: committed events to the live streams of this process.

Events committed by this process are published from the SQLAlchemy
``after_commit`` hook. With PostgreSQL, every transaction that wrote events
also sent ``NOTIFY tellback_events, '<instance>:<id>/<app_id>/<end_user_id>,...'``;
PostgreSQL delivers it at commit to every process, and each broker (except the
writer's own) loads the rows that a stream of its own may want (the end user's,
or an agent's of the app) and publishes them. So an event committed by one
``tellback serve`` reaches a stream held by another, and a process reads back
only events it may hand out.

A stream that cannot keep up (its queue fills) is closed rather than allowed to
grow: the client reconnects with ``Last-Event-ID`` and replays from the
database, so a slow reader costs memory of its own bounded queue only.

Streams are capped, since each holds a socket (a file descriptor) for hours and
opening one is cheap: without caps a few sessions could take every descriptor
of the process, and health checks and new sessions with them. An end user or
an agent past its cap gets the new stream and its oldest one ends (most often
a tab or an app instance that is gone, or a dead connection the new one
replaces); that end asks the client to wait :data:`SUPERSEDED_RETRY_MS` before
it comes back, so two instances that both still run take turns slowly rather
than knock each other off every two seconds. Caps across holders (one client
address, the whole process) refuse the new stream instead: ending a stranger's
stream would make room for nobody in particular. The caps are per process.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from uuid import UUID

import structlog
from sqlalchemy import select

from tellback_server.db.engine import Database
from tellback_server.db.listen import Channel
from tellback_server.db.models import Event
from tellback_server.domain.events.records import (
    EVENT_COLUMNS,
    NOTIFY_CHANNEL,
    PENDING_KEY,
    EventRecord,
)
from tellback_server.http.errors import RateLimited, ServiceUnavailable
from tellback_server.metrics import Metrics

try:
    import resource
except ImportError:  # (not on Windows)
    resource = None  # type: ignore[assignment]

log = structlog.get_logger("tellback.events")

QUEUE_SIZE = 256

# A phone, a tablet and a browser tab, each with a reconnect overlapping the
# connection it replaces before the server has noticed that one is dead.
MAX_PER_USER = 5
MAX_PER_AGENT = 10  # a console tab or two, a bot, a script...
# Client streams of every end user behind one address. Generous: an office or a
# mobile carrier's NAT puts many honest users behind one address.
MAX_PER_ADDRESS = 100
MAX_STREAMS = 5000
SUPERSEDED_RETRY_MS = 30_000
ADDRESS_RETRY_AFTER = 30
FULL_RETRY_AFTER = 10


def process_cap() -> int:
    """:data:`MAX_STREAMS`, or half of the process's descriptor limit if that is lower:
    the other half stays for ordinary requests, the database pool and files, so a
    server full of streams still answers ``/healthz`` and makes new sessions."""
    if resource is None:
        return MAX_STREAMS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_STREAMS
    return max(1, min(MAX_STREAMS, soft // 2))


class Subscription:
    """One live stream's mailbox. ``None`` in the queue means: end the stream."""

    def __init__(
        self,
        *,
        client: bool,
        key: UUID,
        app_ids: frozenset[UUID],
        address: str | None = None,
        seq: int = 0,
    ) -> None:
        self.client = client
        self.key = key  # the end user (client streams) or the agent
        self.app_ids = app_ids
        self.address = address  # the client's (client streams only)
        self.seq = seq  # the order streams opened in: the lowest is the oldest
        self.queue: asyncio.Queue[EventRecord | None] = asyncio.Queue(QUEUE_SIZE)
        self.ended = False
        self.released = False  # unsubscribed: counted no more
        self.farewell: bytes | None = None  # the stream's last bytes, when it ends

    @property
    def holder(self) -> tuple[bool, UUID]:
        return self.client, self.key

    def offer(self, record: EventRecord) -> None:
        if self.ended:
            return
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            log.warning("events.stream_overflow", client=self.client)
            self.end()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        # Make room for the end marker: the stream stops, the client replays on reconnect.
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    def supersede(self, cap: int) -> None:
        """End the stream to make room for a newer one of its holder; the client waits
        longer than usual before it reconnects (if it still runs at all)."""
        who = "end user" if self.client else "agent"
        self.farewell = (
            f"retry: {SUPERSEDED_RETRY_MS}\n"
            f": superseded: this {who} opened more than {cap} streams; the oldest ends\n\n"
        ).encode()
        self.end()


def _seq(sub: Subscription) -> int:
    return sub.seq


class EventBroker:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self._by_user: dict[UUID, set[Subscription]] = defaultdict(set)
        self._by_app: dict[UUID, set[Subscription]] = defaultdict(set)
        self._by_holder: dict[tuple[bool, UUID], set[Subscription]] = defaultdict(set)
        self._by_address: Counter[str] = Counter()
        self._seq = itertools.count()
        self._count = 0
        self.max_per_user = MAX_PER_USER
        self.max_per_agent = MAX_PER_AGENT
        self.max_per_address = MAX_PER_ADDRESS
        self.max_streams = process_cap()
        self.closed = False
        self.metrics = metrics
        self._notified: asyncio.Queue[list[int]] = asyncio.Queue()  # event ids, see channel()

    @property
    def subscriptions(self) -> int:
        return self._count

    def subscribe_client(
        self, app_id: UUID, end_user_id: UUID, address: str | None = None
    ) -> Subscription:
        """A new stream, or :class:`RateLimited` / :class:`ServiceUnavailable` (see the
        module's docstring); it may end the end user's oldest stream."""
        sub = Subscription(
            client=True,
            key=end_user_id,
            app_ids=frozenset({app_id}),
            address=address,
            seq=next(self._seq),
        )
        self._admit(sub, self.max_per_user)
        self._by_user[end_user_id].add(sub)
        return self._added(sub)

    def subscribe_agent(self, agent_id: UUID, app_ids: frozenset[UUID]) -> Subscription:
        sub = Subscription(client=False, key=agent_id, app_ids=app_ids, seq=next(self._seq))
        self._admit(sub, self.max_per_agent)
        for app_id in app_ids:
            self._by_app[app_id].add(sub)
        return self._added(sub)

    def _admit(self, sub: Subscription, per_holder: int) -> None:
        """Refuse ``sub`` past a cap across holders, else end the oldest streams of its
        holder past the holder's cap. Streams already ended still count in the totals
        until they have closed: each holds its socket until then."""
        live = sorted((s for s in self._by_holder.get(sub.holder, ()) if not s.ended), key=_seq)
        oldest = live[: max(0, len(live) - max(1, per_holder) + 1)]
        kind = "client" if sub.client else "agent"
        if self._count - len(oldest) >= self.max_streams:
            self._capped(kind, "refused", "process")
            log.warning("events.stream_refused", cap="process", streams=self._count)
            raise ServiceUnavailable(
                "this server holds as many live streams as it can; retry after the given delay",
                retry_after=FULL_RETRY_AFTER,
            )
        if sub.address is not None:
            freed = sum(1 for s in oldest if s.address == sub.address)
            if self._by_address[sub.address] - freed >= self.max_per_address:
                self._capped(kind, "refused", "address")
                log.info("events.stream_refused", cap="address")
                raise RateLimited(
                    "too many live streams from this address; retry after the given delay",
                    retry_after=ADDRESS_RETRY_AFTER,
                )
        for old in oldest:
            old.supersede(per_holder)
            self._capped(kind, "ended", "end_user" if sub.client else "agent")

    def _capped(self, stream: str, action: str, cap: str) -> None:
        if self.metrics is not None:
            self.metrics.sse_capped.labels(stream, action, cap).inc()

    def _added(self, sub: Subscription) -> Subscription:
        self._count += 1
        self._by_holder[sub.holder].add(sub)
        if sub.address is not None:
            self._by_address[sub.address] += 1
        if self.closed:
            sub.end()
        self._gauge()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget ``sub``; once only (its stream's end, or the stream dropped unread)."""
        if sub.released:
            return
        sub.released = True
        index = self._by_user if sub.client else self._by_app
        keys = [sub.key] if sub.client else list(sub.app_ids)
        for key in keys:
            subs = index.get(key)
            if subs is not None and sub in subs:
                subs.discard(sub)
                if not subs:
                    del index[key]
        held = self._by_holder.get(sub.holder)
        if held is not None and sub in held:
            held.discard(sub)
            if not held:
                del self._by_holder[sub.holder]
        if sub.address is not None:
            self._by_address[sub.address] -= 1
            if self._by_address[sub.address] <= 0:
                del self._by_address[sub.address]
        self._count -= 1
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.sse_streams.set(self._count)

    def publish(self, records: Iterable[EventRecord]) -> None:
        for record in records:
            if record.client_data is not None and record.end_user_id is not None:
                for sub in tuple(self._by_user.get(record.end_user_id, ())):
                    if record.app_id in sub.app_ids:
                        sub.offer(record)
            if record.data is not None:
                for sub in tuple(self._by_app.get(record.app_id, ())):
                    sub.offer(record)

    def close(self) -> None:
        """End every stream (server shutdown): each closes cleanly, clients reconnect elsewhere."""
        self.closed = True
        self.end_all()

    def end_all(self) -> None:
        for subs in (*self._by_user.values(), *self._by_app.values()):
            for sub in tuple(subs):
                sub.end()

    def install_commit_hook(self, db: Database) -> None:
        db.on_commit(PENDING_KEY, self.publish)

    def channel(self, db: Database) -> Channel:
        """``NOTIFY tellback_events`` from other processes: the events a stream here may
        want are queued for :meth:`load_forever` to read and publish. When the connection
        drops, every stream ends: events committed while nobody here listened would never
        reach them, and their clients reconnect and replay from the database."""

        def on_notify(payload: str) -> None:
            # Rows no stream here may want are not read (a stream opened later replays
            # from the database what it missed): processes sharing one database do not
            # each read every event back.
            if not self._count:
                return
            instance, _, entries = payload.partition(":")
            if instance == db.instance or not entries:
                return
            wanted = [int(e.partition("/")[0]) for e in entries.split(",") if self._may_want(e)]
            if wanted:
                self._notified.put_nowait(wanted)

        return Channel(NOTIFY_CHANNEL, on_notify, on_lost=self.end_all)

    def _may_want(self, entry: str) -> bool:
        """Whether a stream here may want the event a notification names
        (``id/app_id/end_user_id``; a bare id, from an older process: yes)."""
        _, named, rest = entry.partition("/")
        if not named:
            return True
        app, _, user = rest.partition("/")
        try:
            app_id, user_id = UUID(app), UUID(user) if user else None
        except ValueError:
            return True
        return app_id in self._by_app or (user_id is not None and user_id in self._by_user)

    async def load_forever(self, db: Database) -> None:
        """Read and publish the events :meth:`channel` was notified of, until cancelled."""
        while True:
            ids = await self._notified.get()
            while not self._notified.empty():  # one query for everything that arrived meanwhile
                ids.extend(self._notified.get_nowait())
            if not self._count:  # the last stream closed meanwhile
                continue
            try:
                async with db.session(write=False) as session:
                    rows = await session.execute(
                        select(*EVENT_COLUMNS).where(Event.id.in_(ids)).order_by(Event.id)
                    )
                    records = [EventRecord.from_row(r) for r in rows]
            except Exception as exc:  # noqa: BLE001 (streams recover by replay on reconnect)
                log.warning("events.load_failed", error_type=type(exc).__name__)
                continue
            self.publish(records)
