"""Writing jobs: always inside the caller's transaction, so they commit with the data."""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from sqlalchemy import insert, text
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
) -> UUID:
    """Queue a job in ``db``'s open transaction and wake workers when it commits."""
    now = dt.datetime.now(dt.UTC)
    job_id: UUID = uuid7()
    await db.execute(
        insert(Job).values(
            id=job_id,
            kind=kind,
            payload=payload,
            status="queued",
            attempts=0,
            max_attempts=max_attempts,
            run_after=run_after or now,
            created_at=now,
            updated_at=now,
        )
    )
    if db.get_bind().dialect.name == "postgresql":
        # Delivered by PostgreSQL only when (and if) the transaction commits.
        await db.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))
    db.info["jobs_enqueued"] = db.info.get("jobs_enqueued", 0) + 1
    return job_id
