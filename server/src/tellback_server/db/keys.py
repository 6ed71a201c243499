"""Statements writing an idempotent create's key together with its stored answer.

One INSERT ... ON CONFLICT DO NOTHING, the last write of the request's
transaction (see ``http/idempotency.py``); on PostgreSQL it may ride along in a
CTE of the request's own last statement (:func:`with_answer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import CTE, Insert, TextClause, bindparam, func, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from tellback_server.db.base import table_of
from tellback_server.db.models import IdempotencyKey
from tellback_server.db.prepared import Prepared

KEYS = table_of(IdempotencyKey)
KEY_COLUMNS = (
    "id",
    "scope",
    "key",
    "request_hash",
    "response_status",
    "response_body",
    "expires_at",
    "created_at",
    "updated_at",
)


def _claim_statement() -> TextClause:
    # Plain text, the same on SQLite and PostgreSQL: SQLAlchemy's dialect-specific
    # ON CONFLICT constructs cannot be cached, so they would compile on every request.
    cols = [c for c in KEYS.c if c.key in KEY_COLUMNS]
    names = ", ".join(f'"{c.name}"' for c in cols)
    values = ", ".join(f":{c.key}" for c in cols)
    # Names from our own table; every value is a bound parameter.
    sql = f"INSERT INTO {KEYS.name} ({names}) VALUES ({values}) "  # noqa: S608
    sql += 'ON CONFLICT ("scope", "key") DO NOTHING RETURNING "id"'
    return text(sql).bindparams(*(bindparam(c.key, type_=c.type) for c in cols))


_CLAIM = Prepared(_claim_statement())


def claim(db: Session, row: Mapping[str, Any]) -> bool:
    """Insert the key with its answer (``KEY_COLUMNS``); False if the key is taken."""
    return bool(_CLAIM.execute(db, row))


def answer_cte(prefix: str = "", gate: CTE | None = None) -> CTE:
    """PostgreSQL: the key row's INSERT ... ON CONFLICT DO NOTHING RETURNING id as a
    data-modifying CTE (no row: the key was taken), with :func:`key_params`'s
    parameters, each name after ``prefix`` (as is the CTE's); with ``gate`` (a CTE), no
    row either when the gate has none. For statements built once: the ON CONFLICT
    construct compiles there."""
    values = select(*(bindparam(f"{prefix}key_{k}", type_=KEYS.c[k].type) for k in KEY_COLUMNS))
    if gate is not None:
        values = values.select_from(gate)
    return (
        postgresql.insert(KEYS)
        .from_select(list(KEY_COLUMNS), values)
        .on_conflict_do_nothing(index_elements=[KEYS.c.scope, KEYS.c.key])
        .returning(KEYS.c.id)
        .cte(f"{prefix}answer")
    )


def with_answer(statement: Insert) -> Prepared:
    """PostgreSQL: ``statement`` (an INSERT ... RETURNING) that also inserts a key row,
    in a data-modifying CTE of the same round trip. One more RETURNING column, last,
    counts the key rows inserted (0: the key was taken). Parameters: the statement's
    own and :func:`key_params`."""
    answer = answer_cte()
    written = select(func.count()).select_from(answer).scalar_subquery()
    return Prepared(statement.add_cte(answer).returning(written))


def key_params(row: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`with_answer`'s parameters for a key row."""
    return {f"key_{k}": v for k, v in row.items()}
