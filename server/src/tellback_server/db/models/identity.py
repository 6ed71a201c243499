from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from tellback_server.db.base import GUID, JSON, DateTimeUTC, UUIDv7AuditBase


class EndUser(UUIDv7AuditBase):
    """A person using an app: anonymous (bound to one installation) or identified (external_id)."""

    __tablename__ = "end_users"
    __table_args__ = (UniqueConstraint("app_id", "external_id"),)

    app_id: Mapped[UUID] = mapped_column(
        GUID, ForeignKey("apps.id", ondelete="CASCADE"), index=True
    )
    external_id: Mapped[str | None] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    merged_into_id: Mapped[UUID | None] = mapped_column(GUID)


class Installation(UUIDv7AuditBase):
    """One install of the app on one device, named by the SDK's installation_id."""

    __tablename__ = "installations"
    __table_args__ = (UniqueConstraint("app_id", "installation_id"),)

    app_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("apps.id", ondelete="CASCADE"))
    installation_id: Mapped[str] = mapped_column(String(64))
    anonymous_user_id: Mapped[UUID | None] = mapped_column(
        GUID, ForeignKey("end_users.id", ondelete="SET NULL")
    )
    current_user_id: Mapped[UUID | None] = mapped_column(
        GUID, ForeignKey("end_users.id", ondelete="SET NULL")
    )
    device: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ClientSession(UUIDv7AuditBase):
    __tablename__ = "client_sessions"
    __table_args__ = (Index("ix_client_sessions_installation", "installation_pk"),)

    app_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("apps.id", ondelete="CASCADE"))
    end_user_id: Mapped[UUID] = mapped_column(
        GUID, ForeignKey("end_users.id", ondelete="CASCADE"), index=True
    )
    installation_pk: Mapped[UUID] = mapped_column(
        GUID, ForeignKey("installations.id", ondelete="CASCADE")
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
