"""Writing jobs: always inside the caller's transaction, so they commit with the data."""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from uuid_utils.compat import uuid7

from tellback_server.db.base import table_of
from tellback_server.db.engine import WithInfo, notify
from tellback_server.db.models import Job
from tellback_server.db.prepared import insert_into
from tellback_server.jobs.notify import ENQUEUED_KEY, NOTIFY_CHANNEL

JOB_COLUMNS = (
    "id",
    "kind",
    "payload",
    "status",
    "attempts",
    "max_attempts",
    "run_after",
    "dedupe_key",
    "created_at",
    "updated_at",
)
_INSERT = insert_into(table_of(Job), JOB_COLUMNS)


async def enqueue(
    db: AsyncSession,
    kind: str,
    payload: dict[str, Any],
    *,
    max_attempts: int = 10,
    run_after: dt.datetime | None = None,
    dedupe_key: str | None = None,
) -> UUID | None:
    """Queue a job in ``db``'s open transaction (see :func:`enqueue_in`)."""
    return await db.run_sync(
        enqueue_in,
        kind,
        payload,
        max_attempts=max_attempts,
        run_after=run_after,
        dedupe_key=dedupe_key,
    )


def enqueue_in(
    db: Session,
    kind: str,
    payload: dict[str, Any],
    *,
    max_attempts: int = 10,
    run_after: dt.datetime | None = None,
    dedupe_key: str | None = None,
) -> UUID | None:
    """Queue a job in ``db``'s open transaction and wake workers when it commits.

    With ``dedupe_key``, a job whose key was queued before is not queued again
    (returns None): a handler that fans out work may safely run twice.
    """
    values = job_row(
        kind, payload, max_attempts=max_attempts, run_after=run_after, dedupe_key=dedupe_key
    )
    job_id: UUID = values["id"]
    is_pg = db.get_bind().dialect.name == "postgresql"
    if dedupe_key is None:
        _INSERT.execute(db, values)
    else:
        dialect_insert = postgresql.insert if is_pg else sqlite.insert
        stmt = (
            dialect_insert(Job)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["dedupe_key"])
            .returning(Job.id)
        )
        if db.execute(stmt).first() is None:
            return None
    notify(db, NOTIFY_CHANNEL)  # wakes other processes' workers at commit
    wake_at_commit(db)
    return job_id


def job_row(
    kind: str,
    payload: dict[str, Any],
    *,
    max_attempts: int = 10,
    run_after: dt.datetime | None = None,
    dedupe_key: str | None = None,
) -> dict[str, Any]:
    """A new job's row (``JOB_COLUMNS``), for :func:`enqueue_in` or a statement that
    inserts it along with other rows (then NOTIFY ``NOTIFY_CHANNEL`` and
    :func:`wake_at_commit` are the writer's to do)."""
    now = dt.datetime.now(dt.UTC)
    return {
        "id": uuid7(),
        "kind": kind,
        "payload": payload,
        "status": "queued",
        "attempts": 0,
        "max_attempts": max_attempts,
        "run_after": run_after or now,
        "dedupe_key": dedupe_key,
        "created_at": now,
        "updated_at": now,
    }


def wake_at_commit(db: WithInfo) -> None:
    """Wake this process's workers when ``db``'s transaction commits (a job was queued)."""
    db.info[ENQUEUED_KEY] = db.info.get(ENQUEUED_KEY, 0) + 1
