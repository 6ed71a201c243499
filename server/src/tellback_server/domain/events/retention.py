"""How long events are kept: the replay window of live streams and the webhook log."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete

from tellback_server.db.models import Event
from tellback_server.jobs.registry import JobRegistry
from tellback_server.state import AppState

EVENT_RETENTION = dt.timedelta(days=7)


async def purge_events(state: AppState) -> None:
    """Events older than the retention go, and with them their delivery log (cascade)."""
    async with state.db.session(write=True) as db:
        await db.execute(
            delete(Event).where(Event.created_at < dt.datetime.now(dt.UTC) - EVENT_RETENTION)
        )


def register(registry: JobRegistry) -> None:
    registry.periodic("events.purge", 3600.0, purge_events)
