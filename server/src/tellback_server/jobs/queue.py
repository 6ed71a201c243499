"""Writing jobs: always inside the caller's transaction, so they commit with the data."""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from sqlalchemy import insert, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from tellback_server.db.models import Job

NOTIFY_CHANNEL = "tellback_jobs"


async def enqueue(
    db: AsyncSession,
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
    now = dt.datetime.now(dt.UTC)
    job_id: UUID = uuid7()
    values = {
        "id": job_id,
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
    is_pg = db.get_bind().dialect.name == "postgresql"
    if dedupe_key is None:
        await db.execute(insert(Job).values(**values))
    else:
        dialect_insert = postgresql.insert if is_pg else sqlite.insert
        stmt = (
            dialect_insert(Job)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["dedupe_key"])
            .returning(Job.id)
        )
        if (await db.execute(stmt)).first() is None:
            return None
    if is_pg:
        # Delivered by PostgreSQL only when (and if) the transaction commits.
        await db.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))
    db.info["jobs_enqueued"] = db.info.get("jobs_enqueued", 0) + 1
    return job_id
