"""Waking workers the moment a job commits.

In one process an ``asyncio.Event`` is set after a commit that enqueued jobs
(the SQLAlchemy ``after_commit`` hook); across processes PostgreSQL delivers
``NOTIFY tellback_jobs`` at commit to every listening worker. Polling stays as
a slow safety net only (``TELLBACK_WORKER_POLL_SECONDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session

log = structlog.get_logger("tellback.jobs")


class JobNotifier:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._listener: Any = None

    def wake(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        self._event.clear()

    def install_commit_hook(self, session_class: type[Session]) -> None:
        @event.listens_for(session_class, "after_commit")
        def _after_commit(session: Session) -> None:
            if session.info.pop("jobs_enqueued", 0):
                self.wake()

        @event.listens_for(session_class, "after_rollback")
        def _after_rollback(session: Session) -> None:
            session.info.pop("jobs_enqueued", None)

    async def listen_postgres(self, dsn: str, channel: str) -> None:
        """Hold a LISTEN connection (asyncpg) that wakes this process's workers."""
        backoff = 1.0
        while True:
            try:
                conn = await asyncpg.connect(dsn)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("jobs.listen_failed", error_type=type(exc).__name__, retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(channel, lambda *_args: self.wake())
                self.wake()  # catch up on anything committed while we were not listening
                await lost.wait()
                log.warning("jobs.listen_connection_lost")
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()
