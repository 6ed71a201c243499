from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from sqlalchemy import Column, ForeignKey, LargeBinary, String, Table, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from tellback_server.db.base import GUID, JSON, DateTimeUTC, UUIDv7AuditBase, metadata

# One row, sealed with TELLBACK_SECRET_KEY by the first process to start on the database:
# a process started with another key is refused before it seals or opens anything, even
# while no app (whose identity secret would tell) exists yet.
secret_key_checks = Table(
    "secret_key_checks",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("sealed", LargeBinary, nullable=False),
)


class AdminToken(UUIDv7AuditBase):
    __tablename__ = "admin_tokens"

    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))


class App(UUIDv7AuditBase):
    __tablename__ = "apps"

    name: Mapped[str] = mapped_column(String(200))
    bundle_id: Mapped[str | None] = mapped_column(String(255))
    android_package: Mapped[str | None] = mapped_column(String(255))
    # The app key is a public identifier compiled into every app build, not a secret.
    app_key: Mapped[str] = mapped_column(String(64), unique=True)
    previous_app_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AppIdentitySecret(UUIDv7AuditBase):
    """An HS256 key that signs end-user identity tokens; several may be live during rotation."""

    __tablename__ = "app_identity_secrets"
    __table_args__ = (UniqueConstraint("app_id", "kid"),)

    app_id: Mapped[UUID] = mapped_column(
        GUID, ForeignKey("apps.id", ondelete="CASCADE"), index=True
    )
    kid: Mapped[str] = mapped_column(String(64))
    secret_sealed: Mapped[bytes] = mapped_column(LargeBinary)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
