from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from tellback_server.db.base import GUID, JSON, DateTimeUTC, UUIDv7AuditBase


class Conversation(UUIDv7AuditBase):
    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_user_activity", "end_user_id", "public_activity_at", "id"),
        Index("ix_conversations_app_activity", "app_id", "last_activity_at", "id"),
        # The agents' backlog, for their push badges (domain/push/delivery.py): small.
        Index(
            "ix_conversations_agent_unread",
            "app_id",
            postgresql_where=text("agent_unread_count > 0"),
            sqlite_where=text("agent_unread_count > 0"),
        ),
    )

    app_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("apps.id", ondelete="CASCADE"))
    end_user_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("end_users.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="open")
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    subject: Mapped[str | None] = mapped_column(String(300))
    category: Mapped[str | None] = mapped_column(String(100))
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    custom_fields: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    context: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    location: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    assignee_id: Mapped[UUID | None] = mapped_column(
        GUID, ForeignKey("agents.id", ondelete="SET NULL")
    )
    last_message_id: Mapped[UUID | None] = mapped_column(GUID)
    last_activity_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    # What the end user sees: internal notes move neither of these.
    last_public_message_id: Mapped[UUID | None] = mapped_column(GUID)
    public_activity_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    # Agent messages the end user has not read yet (the badge number is their sum).
    user_unread_count: Mapped[int] = mapped_column(Integer, default=0)
    user_read_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    # User messages no agent has read yet (agent inbox unread marker).
    agent_unread_count: Mapped[int] = mapped_column(Integer, default=0)


class Message(UUIDv7AuditBase):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_created", "conversation_id", "created_at", "id"),
    )

    conversation_id: Mapped[UUID] = mapped_column(
        GUID, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    app_id: Mapped[UUID] = mapped_column(
        GUID, ForeignKey("apps.id", ondelete="CASCADE"), index=True
    )
    author_type: Mapped[str] = mapped_column(String(16))
    # Not indexed: a user writes only in their own conversations, so their messages are
    # found through ``conversation_id``. An index on it took a page write per feedback
    # at a random place (migration 0005).
    author_user_id: Mapped[UUID | None] = mapped_column(GUID)
    author_agent_id: Mapped[UUID | None] = mapped_column(GUID)
    body: Mapped[str | None] = mapped_column(Text)
    internal: Mapped[bool] = mapped_column(Boolean, default=False)
    attachment_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    location: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Attachment(UUIDv7AuditBase):
    """An upload and, once complete, the attachment it becomes (photo, video, file, log)."""

    __tablename__ = "attachments"
    __table_args__ = (
        Index("ix_attachments_status_expires", "status", "expires_at"),
        Index("ix_attachments_uploader", "app_id", "uploader_user_id"),
    )

    app_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("apps.id", ondelete="CASCADE"))
    uploader_user_id: Mapped[UUID | None] = mapped_column(
        GUID, ForeignKey("end_users.id", ondelete="CASCADE")
    )
    message_id: Mapped[UUID | None] = mapped_column(GUID, index=True)
    kind: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(400))
    method: Mapped[str] = mapped_column(String(16))  # single | multipart
    multipart_upload_id: Mapped[str | None] = mapped_column(String(1024))
    part_size: Mapped[int | None] = mapped_column(BigInteger)
    part_count: Mapped[int] = mapped_column(Integer, default=1)
    # pending -> processing -> ready | rejected; pending -> expired | aborted
    status: Mapped[str] = mapped_column(String(16), default="pending")
    reason: Mapped[str | None] = mapped_column(String(500))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    duration_s: Mapped[float | None] = mapped_column(Float)
    codec: Mapped[str | None] = mapped_column(String(64))
    thumbnail_key: Mapped[str | None] = mapped_column(String(400))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
