"""Queueing webhook deliveries in the transaction that writes their events."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import (
    CTE,
    Exists,
    Integer,
    String,
    bindparam,
    cast,
    exists,
    func,
    insert,
    literal,
    null,
    select,
    true,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from uuid_utils.compat import uuid7

from tellback_server.db.base import table_of
from tellback_server.db.models import Job, WebhookDelivery, WebhookEndpoint
from tellback_server.db.prepared import Prepared, insert_into
from tellback_server.jobs.queue import JOB_COLUMNS, enqueue_in

if TYPE_CHECKING:
    from tellback_server.domain.events.records import EventRecord

JOB_KIND = "webhook.deliver"
# Webhooks carry the agent view of these types (unread.changed is the end user's only).
# attachment.updated tells a receiver that a photo or video it got without a URL (still
# processing when its message was sent) can now be fetched.
WEBHOOK_EVENT_TYPES = (
    "conversation.created",
    "conversation.updated",
    "message.created",
    "attachment.updated",
)
_DELIVERY_COLUMNS = (
    "id",
    "app_id",
    "endpoint_id",
    "event_id",
    "event_type",
    "status",
    "attempts",
    "next_attempt_at",
    "created_at",
    "updated_at",
)
_INSERT = insert_into(table_of(WebhookDelivery), _DELIVERY_COLUMNS)
_ENDPOINT_TABLE = table_of(WebhookEndpoint)
_ENDPOINTS = Prepared(
    select(WebhookEndpoint.id, WebhookEndpoint.events).where(
        WebhookEndpoint.app_id == bindparam("app_id"), WebhookEndpoint.enabled.is_(True)
    )
)


def any_endpoint(app_id: Any = None) -> Exists:
    """Whether the app (``app_id``: a column of the enclosing query, or by default the
    parameter ``app_id``) has an enabled webhook endpoint: for a query that asks it
    along with what it reads anyway (see :func:`queue_deliveries`)."""
    if app_id is None:
        app_id = bindparam("app_id", type_=_ENDPOINT_TABLE.c.app_id.type)
    return exists().where(_ENDPOINT_TABLE.c.app_id == app_id, _ENDPOINT_TABLE.c.enabled.is_(True))


def endpoints_of() -> Any:
    """The enabled endpoints of the app (parameter ``app_id``) as a JSON array of
    ``[id, events]`` pairs, NULL for none: for a query that reads them along with what it
    reads anyway (a new feedback on PostgreSQL, which then queues its deliveries in its
    one statement, :func:`delivery_ctes`)."""
    endpoints = _ENDPOINT_TABLE
    return (
        select(func.jsonb_agg(func.jsonb_build_array(endpoints.c.id, endpoints.c.events)))
        .where(
            endpoints.c.app_id == bindparam("app_id", type_=endpoints.c.app_id.type),
            endpoints.c.enabled.is_(True),
        )
        .scalar_subquery()
    )


# The parameters planned_deliveries() gives delivery_ctes(), one set per statement.
DELIVERY_PARAMS = ("w_ids", "w_endpoints", "w_jobs", "w_max_attempts")


def planned_deliveries(endpoints: Sequence[Any] | None, event_type: str) -> dict[str, Any]:
    """For :func:`delivery_ctes`: a delivery of an event of ``event_type`` to each of
    ``endpoints`` (:func:`endpoints_of`'s pairs) that wants it, as its parameters."""
    wanted = [
        UUID(str(endpoint_id))
        for endpoint_id, types in endpoints or ()
        if event_type in WEBHOOK_EVENT_TYPES and (not types or event_type in types)
    ]
    return {
        "w_ids": [uuid7() for _ in wanted],
        "w_endpoints": wanted,
        "w_jobs": [uuid7() for _ in wanted],
        "w_max_attempts": len(SCHEDULE) + 1,
    }


def delivery_ctes(event: CTE) -> tuple[CTE, CTE]:
    """PostgreSQL: the deliveries :func:`planned_deliveries` planned, of the one event
    ``event`` (a data-modifying CTE returning its ``id``, ``type``, ``app_id`` and
    ``created_at``), and their jobs, as data-modifying CTEs: the rows
    :func:`queue_deliveries` writes, for a statement that writes the event too (no
    event, no deliveries). An endpoint deleted since it was read is skipped."""
    created_at = event.c.created_at
    planned = (
        func.unnest(
            bindparam("w_ids", type_=postgresql.ARRAY(postgresql.UUID())),
            bindparam("w_endpoints", type_=postgresql.ARRAY(postgresql.UUID())),
            bindparam("w_jobs", type_=postgresql.ARRAY(postgresql.UUID())),
        )
        .table_valued("id", "endpoint_id", "job_id")
        .render_derived()
    )
    deliveries = table_of(WebhookDelivery)
    # The values queue_deliveries() gives a delivery and enqueue_in() its job, in SQL.
    values = select(
        planned.c.id,
        event.c.app_id,
        planned.c.endpoint_id,
        event.c.id,
        event.c.type,
        literal("pending"),
        literal(0),
        created_at,
        created_at,
        created_at,
    ).select_from(
        planned.join(_ENDPOINT_TABLE, _ENDPOINT_TABLE.c.id == planned.c.endpoint_id).join(
            event, true()
        )
    )
    written = (
        insert(deliveries)
        .from_select(list(_DELIVERY_COLUMNS), values)
        .returning(deliveries.c.id)
        .cte("new_deliveries")
    )
    jobs = table_of(Job)
    job_values = select(
        planned.c.job_id,
        literal(JOB_KIND),
        func.jsonb_build_object("delivery_id", cast(written.c.id, String)),
        literal("queued"),
        literal(0),
        bindparam("w_max_attempts", type_=Integer),
        created_at,
        null(),
        created_at,
        created_at,
    ).select_from(written.join(planned, planned.c.id == written.c.id))
    queued = insert(jobs).from_select(list(JOB_COLUMNS), job_values).returning(jobs.c.id)
    return written, queued.cte("new_delivery_jobs")


def queue_deliveries(
    db: Session,
    app_id: UUID,
    records: Sequence[EventRecord],
    *,
    has_endpoint: bool | None = None,
) -> None:
    """Queue a delivery of each record to each endpoint that wants it. ``has_endpoint``:
    the caller already asked whether the app has one (False skips the lookup). (A new
    feedback on PostgreSQL queues its deliveries in its own one statement instead:
    :func:`delivery_ctes`, which writes the same rows.)"""
    records = [r for r in records if r.type in WEBHOOK_EVENT_TYPES]
    if not records or has_endpoint is False:
        return
    endpoints = _ENDPOINTS.execute(db, {"app_id": app_id})
    if not endpoints:
        return
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "id": uuid7(),
            "app_id": app_id,
            "endpoint_id": endpoint_id,
            "event_id": record.id,
            "event_type": record.type,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for record in records
        for endpoint_id, types in endpoints
        if not types or record.type in types
    ]
    if not rows:
        return
    _INSERT.execute_many(db, rows)
    for row in rows:
        enqueue_in(db, JOB_KIND, {"delivery_id": str(row["id"])}, max_attempts=len(SCHEDULE) + 1)


# Seconds to wait after failed attempt n (1-based): about 23.6 h in all, then failed.
SCHEDULE = (5, 60, 300, 1800, 7200, 18000, 28800, 28800)
