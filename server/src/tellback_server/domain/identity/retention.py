"""How long ended sessions are kept: a week past their end, so that a client sending an
old token still hears that it expired or was revoked, not that it is unknown. Every new
installation's first session writes a row, so without this the table only grew."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, or_

from tellback_server.db.models import ClientSession
from tellback_server.jobs.registry import JobRegistry
from tellback_server.state import AppState

SESSION_RETENTION = dt.timedelta(days=7)


async def purge_sessions(state: AppState) -> None:
    """Sessions that expired, or were revoked, more than a week ago."""
    before = dt.datetime.now(dt.UTC) - SESSION_RETENTION
    async with state.db.session(write=True) as db:
        await db.execute(
            delete(ClientSession).where(
                or_(ClientSession.expires_at < before, ClientSession.revoked_at < before)
            )
        )


def register(registry: JobRegistry) -> None:
    registry.periodic("sessions.purge", 3600.0, purge_sessions)
