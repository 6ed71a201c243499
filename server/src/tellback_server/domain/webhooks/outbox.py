"""Queueing webhook deliveries in the transaction that writes their events."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import Exists, bindparam, exists, select
from sqlalchemy.orm import Session
from uuid_utils.compat import uuid7

from tellback_server.db.base import table_of
from tellback_server.db.models import WebhookDelivery, WebhookEndpoint
from tellback_server.db.prepared import Prepared, insert_into
from tellback_server.jobs.queue import enqueue_in

if TYPE_CHECKING:
    from tellback_server.domain.events.records import EventRecord

JOB_KIND = "webhook.deliver"
# Webhooks carry the agent view of these types (unread.changed is the end user's only).
WEBHOOK_EVENT_TYPES = ("conversation.created", "conversation.updated", "message.created")
_INSERT = insert_into(
    table_of(WebhookDelivery),
    (
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
    ),
)
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


def queue_deliveries(
    db: Session,
    app_id: UUID,
    records: Sequence[EventRecord],
    *,
    has_endpoint: bool | None = None,
) -> None:
    """Queue a delivery of each record to each endpoint that wants it. ``has_endpoint``:
    the caller already asked whether the app has one (False skips the lookup)."""
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
