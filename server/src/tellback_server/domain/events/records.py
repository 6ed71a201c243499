"""Writing events: in the caller's transaction, published to live streams when it commits.

A service calls :func:`emit` next to the change it makes. The rows are the
replay log for SSE (``Last-Event-ID``) and the source of webhook deliveries,
which are queued here too, so an event, its webhooks and the change commit or
vanish together.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

import msgspec
from sqlalchemy import Insert, String, bindparam, cast, func, insert, literal
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tellback_server.db.base import table_of
from tellback_server.db.engine import WithInfo, notify
from tellback_server.db.keys import key_params, with_answer
from tellback_server.db.models import Event
from tellback_server.db.prepared import Prepared, insert_into

if TYPE_CHECKING:
    from tellback_server.http.idempotency import Answer

PENDING_KEY = "tellback_events"
NOTIFY_CHANNEL = "tellback_events"


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    type: str
    app_id: UUID
    end_user_id: UUID | None
    conversation_id: UUID | None
    # The agent and webhook view (None: not for agents) and the end user's (None: not for
    # the user). As read back from the database, dicts; as written by this process, the
    # views' Structs themselves: the JSON column and the streams encode either alike.
    data: msgspec.Struct | dict[str, Any] | None
    client_data: msgspec.Struct | dict[str, Any] | None
    created_at: dt.datetime

    def envelope(self, *, client: bool) -> dict[str, Any]:
        """What both SSE ``data:`` and webhook bodies carry, as JSON (its ``data`` may be a
        Struct: encode with msgspec)."""
        return {
            "id": str(self.id),
            "type": self.type,
            "timestamp": self.created_at.isoformat().replace("+00:00", "Z"),
            "data": self.client_data if client else self.data,
        }

    @classmethod
    def from_row(cls, row: Any) -> EventRecord:
        return cls(
            id=row.id,
            type=row.type,
            app_id=row.app_id,
            end_user_id=row.end_user_id,
            conversation_id=row.conversation_id,
            data=row.data,
            client_data=row.client_data,
            created_at=row.created_at,
        )


@dataclass(frozen=True, slots=True)
class EventDraft:
    """What a service knows about an event before it has an id."""

    type: str
    conversation_id: UUID | None
    end_user_id: UUID | None
    data: msgspec.Struct | dict[str, Any] | None
    client_data: msgspec.Struct | dict[str, Any] | None = None


EVENT_COLUMNS = (
    Event.id,
    Event.type,
    Event.app_id,
    Event.end_user_id,
    Event.conversation_id,
    Event.data,
    Event.client_data,
    Event.created_at,
)


async def emit(db: AsyncSession, app_id: UUID, drafts: Sequence[EventDraft]) -> list[EventRecord]:
    """Write events in ``db``'s transaction (see :func:`emit_in`)."""
    return await db.run_sync(emit_in, app_id, drafts)


_TABLE = table_of(Event)
# One event (most writes): prepared. Several: one statement whose RETURNING SQLAlchemy
# keeps in the rows' order.
_ONE_COLUMNS = ("type", "app_id", "end_user_id", "conversation_id", "data", "client_data")
ROW_COLUMNS = (*_ONE_COLUMNS, "created_at")  # an event's row as :func:`event_row` makes it
_INSERT_ONE = insert_into(_TABLE, ROW_COLUMNS, returning="id")
_INSERT_MANY = insert(_TABLE).returning(_TABLE.c.id, sort_by_parameter_order=True)


def notified(record: EventRecord) -> str:
    """How a NOTIFY names an event: ``id/app_id/end_user_id`` (the last empty for an event
    of no end user), so a process can tell whether any of its streams may want it
    before it reads the row."""
    return f"{record.id}/{record.app_id}/{record.end_user_id or ''}"


def _as_text(column: Any) -> Any:
    return cast(column, String)


def notifying(statement: Insert) -> Insert:
    """PostgreSQL: ``statement``, an INSERT of one event, returning its id and queuing its
    NOTIFY (delivered at commit, like any NOTIFY), which spares the transaction the
    separate pg_notify round trip. The payload is ``notified()``'s, spelled in SQL, after
    the parameter ``notify_prefix`` (:func:`notify_prefix`)."""
    return statement.returning(
        _TABLE.c.id,
        func.pg_notify(
            literal(NOTIFY_CHANNEL),
            bindparam("notify_prefix", type_=String)
            + _as_text(_TABLE.c.id)
            + "/"
            + _as_text(_TABLE.c.app_id)
            + "/"
            + func.coalesce(_as_text(_TABLE.c.end_user_id), ""),
        ),
    )


_ONE_NOTIFYING = notifying(
    insert(_TABLE).values({k: bindparam(k, type_=_TABLE.c[k].type) for k in ROW_COLUMNS})
)
_INSERT_ONE_NOTIFYING = Prepared(_ONE_NOTIFYING)
# ... and also an idempotent create's key with its answer, in the same round trip.
_INSERT_ONE_NOTIFYING_ANSWERED = with_answer(_ONE_NOTIFYING)


def emit_in(
    db: Session,
    app_id: UUID,
    drafts: Sequence[EventDraft],
    *,
    has_endpoint: bool | None = None,
    answer: Answer | None = None,
) -> list[EventRecord]:
    """Write events (one INSERT), queue their webhooks, and publish them at commit.

    ``has_endpoint``: whether the app has a webhook endpoint, when the caller knows.
    ``answer``: an idempotent create's key, whose answer is produced; on PostgreSQL
    the INSERT of a single event writes it too (and sets ``answer.claimed``).
    """
    from tellback_server.domain.webhooks.outbox import queue_deliveries  # noqa: PLC0415

    if not drafts:
        return []
    now = dt.datetime.now(dt.UTC)
    rows = [event_row(app_id, d, now) for d in drafts]
    # Delivered at commit to every process's broker (ours ignores its own instance).
    prefix = notify_prefix(db)
    queued = False
    postgresql = db.get_bind().dialect.name == "postgresql"
    if len(rows) == 1 and postgresql:
        params = {**rows[0], "notify_prefix": prefix}
        if answer is None:
            ids = [_INSERT_ONE_NOTIFYING.execute(db, params)[0][0]]
        else:
            [(event_id, _, written)] = _INSERT_ONE_NOTIFYING_ANSWERED.execute(
                db, {**params, **key_params(answer.key_row)}
            )
            ids, answer.claimed = [event_id], bool(written)
        queued = True
    elif len(rows) == 1:
        ids = [_INSERT_ONE.execute(db, rows[0])[0][0]]
    else:
        ids = list(db.execute(_INSERT_MANY, rows).scalars())
    records = [EventRecord(id=i, **row) for i, row in zip(ids, rows, strict=True)]
    publish_at_commit(db, records)
    if postgresql and not queued:  # (SQLite has no NOTIFY: its streams are in-process)
        notify(db, NOTIFY_CHANNEL, prefix + ",".join(notified(r) for r in records))
    queue_deliveries(
        db, app_id, [r for r in records if r.data is not None], has_endpoint=has_endpoint
    )
    return records


def event_row(app_id: UUID, draft: EventDraft, now: dt.datetime) -> dict[str, Any]:
    """The row of an event (``ROW_COLUMNS``), written at ``now``."""
    return {
        "type": draft.type,
        "app_id": app_id,
        "end_user_id": draft.end_user_id,
        "conversation_id": draft.conversation_id,
        # As they are: the JSON column's bind encodes a Struct with msgspec, faster than
        # making it a dict first (3 % of a new feedback's CPU on SQLite)
        "data": draft.data,
        "client_data": draft.client_data,
        "created_at": now,
    }


def notify_prefix(db: WithInfo) -> str:
    """What this process's NOTIFYs start with: its brokers skip their own events."""
    return f"{db.info.get('instance', '')}:"


def publish_at_commit(db: WithInfo, records: Sequence[EventRecord]) -> None:
    """Hand ``records`` (written in ``db``'s transaction) to this process's broker when
    it commits."""
    db.info.setdefault(PENDING_KEY, []).extend(records)
