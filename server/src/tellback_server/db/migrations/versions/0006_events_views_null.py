"""events: a view that is not there is SQL NULL, not JSON's null

An event meant only for the end user (``unread.changed``) has no agent view
(``data``), and one meant only for agents (an internal note's
``message.created``) has no end-user view (``client_data``). Both were stored as
JSON's ``null``, which ``IS NOT NULL`` lets through, so a resumed stream
replayed events that were not for it, with ``"data": null``: an agent's stream
the end user's unread counts, an end user's stream that an internal note was
written. The columns now store None as SQL NULL; this turns the rows already
written into the same.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # 'null' is JSON text on SQLite and a jsonb literal on PostgreSQL: the same test.
    for column in ("data", "client_data"):
        op.execute(f"UPDATE events SET {column} = NULL WHERE {column} = 'null'")  # noqa: S608


def downgrade() -> None:
    """Nothing to undo: SQL NULL reads back as None, as JSON's null did."""
