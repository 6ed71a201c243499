"""Queueing webhook deliveries in the transaction that writes their events."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING
from uuid import UUID

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from tellback_server.db.models import WebhookDelivery, WebhookEndpoint
from tellback_server.jobs.queue import enqueue

if TYPE_CHECKING:
    from tellback_server.domain.events.records import EventRecord

JOB_KIND = "webhook.deliver"
# Webhooks carry the agent view of these types (unread.changed is the end user's only).
WEBHOOK_EVENT_TYPES = ("conversation.created", "conversation.updated", "message.created")


async def queue_deliveries(db: AsyncSession, app_id: UUID, records: Sequence[EventRecord]) -> None:
    records = [r for r in records if r.type in WEBHOOK_EVENT_TYPES]
    if not records:
        return
    endpoints = (
        await db.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.events).where(
                WebhookEndpoint.app_id == app_id, WebhookEndpoint.enabled.is_(True)
            )
        )
    ).all()
    if not endpoints:
        return
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "id": uuid7(),
            "app_id": app_id,
            "endpoint_id": ep.id,
            "event_id": record.id,
            "event_type": record.type,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for record in records
        for ep in endpoints
        if not ep.events or record.type in ep.events
    ]
    if not rows:
        return
    await db.execute(insert(WebhookDelivery), rows)
    for row in rows:
        await enqueue(db, JOB_KIND, {"delivery_id": str(row["id"])}, max_attempts=len(SCHEDULE) + 1)


# Seconds to wait after failed attempt n (1-based): about 23.6 h in all, then failed.
SCHEDULE = (5, 60, 300, 1800, 7200, 18000, 28800, 28800)
