"""rate_limits: the API processes' shared rate-limit counts

One row per limited key (an app, an end user, a client address), stored as a
keyed hash, with its GCRA theoretical arrival time. Each API process adds what
it admitted and reads back the others' every half second (``ratelimit.py``).
On PostgreSQL the table is UNLOGGED: the counts need no WAL, are not worth
replicating, and start over after a crash or failover. SQLite runs one API
process and leaves it empty.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.LargeBinary(), nullable=False),
        sa.Column("tat", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_rate_limits")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE rate_limits SET UNLOGGED")


def downgrade() -> None:
    op.drop_table("rate_limits")
