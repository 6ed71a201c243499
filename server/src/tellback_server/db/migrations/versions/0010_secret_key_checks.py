"""secret_key_checks: a value sealed with the deployment's TELLBACK_SECRET_KEY

The first process to start on the database seals a random value with its key and
stores it here; every later start opens it, and a process with another key (a node
started without the shared key, a data dir restored without its key file) is refused
at start. Before, the check used the newest app's identity secret, so on a database
with no app yet two nodes with different keys both started and then answered 500 to
each other's sessions.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "secret_key_checks",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_secret_key_checks")),
    )


def downgrade() -> None:
    op.drop_table("secret_key_checks")
