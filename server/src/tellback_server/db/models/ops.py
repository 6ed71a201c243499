from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from tellback_server.db.base import JSON, DateTimeUTC, UUIDv7AuditBase, metadata


class IdempotencyKey(UUIDv7AuditBase):
    """A stored response for an Idempotency-Key, written in the same transaction as its effects."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("scope", "key"),)

    scope: Mapped[str] = mapped_column(String(80))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True), index=True)


class Job(UUIDv7AuditBase):
    """The transactional outbox: a unit of work written with the data that causes it."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "status", "run_after"),)

    kind: Mapped[str] = mapped_column(String(64))
    # Optional: a second job with the same key is not queued (e.g. one push per device+message).
    dedupe_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=10)
    run_after: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    locked_by: Mapped[str | None] = mapped_column(String(120))
    locked_until: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))


# Rate-limit counts shared by the API processes on PostgreSQL (ratelimit.py): per key (a
# keyed hash of it), its theoretical arrival time in seconds since the epoch on the
# database's clock. UNLOGGED on PostgreSQL (migration 0007); unused on SQLite.
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("key", LargeBinary, primary_key=True),
    Column("tat", Double, nullable=False),
)
