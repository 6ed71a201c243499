from __future__ import annotations

import datetime as dt
from uuid import UUID

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from tellback_server.db.base import GUID, DateTimeUTC, UUIDv7AuditBase


class Device(UUIDv7AuditBase):
    """A phone that can receive pushes: an end user's installation or an agent's phone."""

    __tablename__ = "devices"
    __table_args__ = (
        UniqueConstraint("owner_key"),
        UniqueConstraint("provider", "token"),
        Index("ix_devices_end_user", "end_user_id", "active"),
        Index("ix_devices_agent", "agent_id", "active"),
    )

    # The app whose push credentials reach this device.
    app_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("apps.id", ondelete="CASCADE"))
    # "inst:<installation pk>" for end users, "agent:<agent id>:<installation id>" for agents.
    owner_key: Mapped[str] = mapped_column(String(200))
    installation_pk: Mapped[UUID | None] = mapped_column(
        GUID, ForeignKey("installations.id", ondelete="CASCADE")
    )
    end_user_id: Mapped[UUID | None] = mapped_column(
        GUID, ForeignKey("end_users.id", ondelete="CASCADE")
    )
    agent_id: Mapped[UUID | None] = mapped_column(GUID, ForeignKey("agents.id", ondelete="CASCADE"))
    platform: Mapped[str] = mapped_column(String(16))
    provider: Mapped[str] = mapped_column(String(8))  # apns | fcm
    token: Mapped[str] = mapped_column(String(4096))
    apns_environment: Mapped[str | None] = mapped_column(String(16))  # sandbox | production
    locale: Mapped[str | None] = mapped_column(String(35))
    app_version: Mapped[str | None] = mapped_column(String(100))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    deactivated_reason: Mapped[str | None] = mapped_column(String(200))
    deactivated_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))


class PushCredential(UUIDv7AuditBase):
    """An app's APNs or FCM credentials, sealed with TELLBACK_SECRET_KEY; never returned."""

    __tablename__ = "push_credentials"
    __table_args__ = (UniqueConstraint("app_id", "provider"),)

    app_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("apps.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(8))
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    summary: Mapped[str] = mapped_column(String(300))  # e.g. "team ABC, key XYZ, topic com.x"
    last_error: Mapped[str | None] = mapped_column(String(500))
    last_error_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    last_success_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))


class PushDelivery(UUIDv7AuditBase):
    """One attempt to deliver one notification to one device (or why it was skipped)."""

    __tablename__ = "push_deliveries"
    __table_args__ = (Index("ix_push_deliveries_app_created", "app_id", "created_at", "id"),)

    app_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("apps.id", ondelete="CASCADE"))
    device_id: Mapped[UUID | None] = mapped_column(
        GUID, ForeignKey("devices.id", ondelete="SET NULL")
    )
    message_id: Mapped[UUID | None] = mapped_column(GUID)
    conversation_id: Mapped[UUID | None] = mapped_column(GUID)
    job_id: Mapped[UUID | None] = mapped_column(GUID)
    provider: Mapped[str | None] = mapped_column(String(8))
    audience: Mapped[str] = mapped_column(String(8))  # user | agent
    # sent | retrying | failed | skipped | invalid_token
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(500))
    http_status: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
