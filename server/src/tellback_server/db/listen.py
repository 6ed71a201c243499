"""Holding a PostgreSQL ``LISTEN`` connection for as long as the process runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger("tellback.db")


async def listen_forever(
    dsn: str,
    channel: str,
    on_notify: Callable[[str], None],
    *,
    name: str,
    on_connected: Callable[[], None] | None = None,
    on_lost: Callable[[], None] | None = None,
) -> None:
    """Call ``on_notify(payload)`` for each NOTIFY on ``channel``; reconnect with backoff.

    ``on_connected`` runs once listening (catch up on what was committed meanwhile),
    ``on_lost`` when the connection drops (notifications may have been missed).
    Runs until cancelled.
    """
    backoff = 1.0
    while True:
        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning(
                "db.listen_failed", listener=name, error_type=type(exc).__name__, retry_in=backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            continue
        backoff = 1.0
        lost = asyncio.Event()

        def notified(*args: Any) -> None:
            on_notify(str(args[3]))

        try:
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            await conn.add_listener(channel, notified)
            if on_connected is not None:
                on_connected()
            await lost.wait()
            log.warning("db.listen_connection_lost", listener=name)
            if on_lost is not None:
                on_lost()
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
