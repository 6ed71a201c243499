from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from advanced_alchemy.base import IdentityBase
from advanced_alchemy.types import BigIntIdentity
from sqlalchemy import Boolean, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from tellback_server.db.base import GUID, JSON, NULLABLE_JSON, DateTimeUTC, UUIDv7AuditBase


class Event(IdentityBase):
    """One thing that happened, written in the transaction that made it happen.

    The increasing ``id`` is the SSE event id (``Last-Event-ID`` resumes after
    it) and the Standard Webhooks ``webhook-id``. ``data`` is the agent and
    webhook view; ``client_data`` the end user's view (NULL: not for clients,
    e.g. an internal note). Rows go when their conversation or user does.
    """

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_app", "app_id", "id"),
        Index("ix_events_user", "end_user_id", "id"),
        Index("ix_events_created", "created_at"),
        {"sqlite_autoincrement": True},
    )

    type: Mapped[str] = mapped_column(String(40))
    app_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("apps.id", ondelete="CASCADE"))
    end_user_id: Mapped[UUID | None] = mapped_column(
        GUID, ForeignKey("end_users.id", ondelete="CASCADE")
    )
    conversation_id: Mapped[UUID | None] = mapped_column(
        GUID, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    # None is SQL NULL (migration 0006): the streams' replays select by IS NOT NULL.
    data: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSON)
    client_data: Mapped[dict[str, Any] | None] = mapped_column(NULLABLE_JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))


class WebhookEndpoint(UUIDv7AuditBase):
    """A URL of the app's own systems that receives signed events."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_app", "app_id"),)

    app_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("apps.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str | None] = mapped_column(String(200))
    events: Mapped[list[str]] = mapped_column(JSON, default=list)  # empty: every type
    # The signing keys, sealed with TELLBACK_SECRET_KEY (they must be usable, so not hashed).
    secret_sealed: Mapped[bytes] = mapped_column(LargeBinary)
    previous_secret_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    previous_secret_expires_at: Mapped[dt.datetime | None] = mapped_column(
        DateTimeUTC(timezone=True)
    )
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)


class WebhookDelivery(UUIDv7AuditBase):
    """One event on its way to one endpoint; its attempts are the delivery log."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "id"),
        Index("ix_webhook_deliveries_status", "status", "created_at"),
    )

    app_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("apps.id", ondelete="CASCADE"))
    endpoint_id: Mapped[UUID] = mapped_column(
        GUID, ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    event_id: Mapped[int] = mapped_column(
        BigIntIdentity, ForeignKey("events.id", ondelete="CASCADE")
    )
    event_type: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(12), default="pending")  # pending|succeeded|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    last_duration_ms: Mapped[int | None] = mapped_column(Integer)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))


class WebhookAttempt(UUIDv7AuditBase):
    """One HTTP attempt of a delivery: what the receiver answered, and how fast."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "id"),)

    delivery_id: Mapped[UUID] = mapped_column(
        GUID, ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(500))
    response_excerpt: Mapped[str | None] = mapped_column(Text)
