from __future__ import annotations

import datetime as dt
from uuid import UUID

from sqlalchemy import Column, ForeignKey, String, Table, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from tellback_server.db.base import GUID, DateTimeUTC, UUIDv7AuditBase, UUIDv7Base, metadata


class Agent(UUIDv7AuditBase):
    __tablename__ = "agents"

    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))


class AgentApp(UUIDv7Base):
    __tablename__ = "agent_apps"
    __table_args__ = (UniqueConstraint("agent_id", "app_id"),)

    agent_id: Mapped[UUID] = mapped_column(
        GUID, ForeignKey("agents.id", ondelete="CASCADE"), index=True
    )
    app_id: Mapped[UUID] = mapped_column(
        GUID, ForeignKey("apps.id", ondelete="CASCADE"), index=True
    )


# Console sessions their agent signed out of (``domain/console/session.py``): the random id
# sealed in the session cookie, kept until the cookie would have expired anyway, so that a
# copy of the cookie is refused by every process. Pruned at each sign-out.
console_signouts = Table(
    "console_signouts",
    metadata,
    Column("session_id", String(32), primary_key=True),
    Column("expires_at", DateTimeUTC(timezone=True), nullable=False, index=True),
)
