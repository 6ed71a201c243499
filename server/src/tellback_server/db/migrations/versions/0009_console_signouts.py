"""console_signouts: console sessions ended by their agent's sign-out

The console's session is a sealed cookie, valid for 12 hours by itself. Signing
out now also stores the session's random id here, until the cookie would have
expired, and every process refuses a cookie whose id is listed: a copy of the
cookie dies with the sign-out. Each sign-out deletes the rows past their time.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from advanced_alchemy.types import DateTimeUTC
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "console_signouts",
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("expires_at", DateTimeUTC(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_console_signouts")),
    )
    op.create_index(
        op.f("ix_console_signouts_expires_at"), "console_signouts", ["expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_console_signouts_expires_at"), table_name="console_signouts")
    op.drop_table("console_signouts")
