"""messages.author_user_id unindexed

Each message from an end user inserted an entry into this index at a place
chosen by the user's id: one more page at a random spot of the index written
per feedback (to the WAL at commit and again at checkpoint on SQLite, a
full-page image after each checkpoint on PostgreSQL). Its one reader, merging
an anonymous user into an identified one, finds the messages through the
user's conversations instead.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_messages_author_user_id", table_name="messages")


def downgrade() -> None:
    op.create_index("ix_messages_author_user_id", "messages", ["author_user_id"], unique=False)
