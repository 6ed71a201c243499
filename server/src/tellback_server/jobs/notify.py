"""Waking workers the moment a job commits.

In one process an ``asyncio.Event`` is set after a commit that enqueued jobs
(the SQLAlchemy ``after_commit`` hook); across processes PostgreSQL delivers
``NOTIFY tellback_jobs`` at commit to every listening worker. Polling stays as
a slow safety net only (``TELLBACK_WORKER_POLL_SECONDS``).
"""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy import event
from sqlalchemy.orm import Session

from tellback_server.db.listen import listen_forever


class JobNotifier:
    def __init__(self) -> None:
        self._event = asyncio.Event()

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
        # On (re)connect, wake anyway: jobs may have committed while we were not listening.
        await listen_forever(
            dsn, channel, lambda _payload: self.wake(), name="jobs", on_connected=self.wake
        )
