"""conversations: a partial index of the conversations agents have to read

An agent's push badge counts the unread conversations of the apps the agent
serves, at every new feedback and user reply. Without an index of its own that
count read every conversation of the app: 72 ms on SQLite (on the event loop's
thread, so every request waited) and 12 ms on PostgreSQL at 100,000
conversations. The index holds only the conversations with
``agent_unread_count > 0``, so it stays as small as the agents' backlog.

Building it reads the conversations table once, holding off writes to it for that
time: 0.5 s for 500,000 conversations of 1 KiB on PostgreSQL on the benchmark
machine, with the table in memory.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNREAD = sa.text("agent_unread_count > 0")


def upgrade() -> None:
    op.create_index(
        "ix_conversations_agent_unread",
        "conversations",
        ["app_id"],
        postgresql_where=UNREAD,
        sqlite_where=UNREAD,
    )


def downgrade() -> None:
    op.drop_index("ix_conversations_agent_unread", table_name="conversations")
