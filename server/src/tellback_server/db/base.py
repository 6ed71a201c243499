"""Declarative bases: UUIDv7 ids, audit columns and advanced-alchemy's naming convention."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from advanced_alchemy.base import UUIDv7AuditBase, UUIDv7Base, orm_registry
from advanced_alchemy.types import GUID, DateTimeUTC, JsonB
from sqlalchemy import MetaData, Table
from sqlalchemy.dialects import postgresql

metadata: MetaData = orm_registry.metadata

# JSON column that is JSONB on PostgreSQL and JSON text on SQLite.
JSON: Any = JsonB
# The same, storing Python's None as SQL NULL rather than JSON's null: for columns whose
# NULL a query tests (``IS NOT NULL``), where JSON's null would pass.
NULLABLE_JSON: Any = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)

__all__ = [
    "GUID",
    "JSON",
    "NULLABLE_JSON",
    "DateTimeUTC",
    "UUIDv7AuditBase",
    "UUIDv7Base",
    "metadata",
    "table_of",
]


def table_of(model: type[Any]) -> Table:
    """A model's Core table, for hot-path statements that need no ORM work."""
    table: Table = model.__table__
    return table
