"""Waking workers the moment a job commits.

In one process an ``asyncio.Event`` is set after a commit that enqueued jobs
(a commit hook, :meth:`Database.on_commit`); across processes PostgreSQL delivers
``NOTIFY tellback_jobs`` at commit to every listening worker. Polling stays as
a slow safety net only (``TELLBACK_WORKER_POLL_SECONDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from tellback_server.db.listen import Channel, listen_forever

if TYPE_CHECKING:
    from tellback_server.db.engine import Database

ENQUEUED_KEY = "jobs_enqueued"  # session.info: jobs this transaction queued
NOTIFY_CHANNEL = "tellback_jobs"


class JobNotifier:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        self._event.clear()

    def install_commit_hook(self, db: Database) -> None:
        db.on_commit(ENQUEUED_KEY, lambda _count: self.wake())

    def channel(self) -> Channel:
        """``NOTIFY tellback_jobs`` wakes this process's workers. On (re)connecting they
        wake anyway: jobs may have committed while nobody here was listening."""
        return Channel(NOTIFY_CHANNEL, lambda _payload: self.wake(), on_connected=self.wake)

    async def listen_postgres(self, dsn: str) -> None:
        """Hold a LISTEN connection of its own (``tellback worker``: no app to share one)."""
        await listen_forever(dsn, [self.channel()], name="jobs")
