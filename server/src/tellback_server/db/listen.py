"""A process's PostgreSQL ``LISTEN`` connection, held for as long as the process runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger("tellback.db")


@dataclass(frozen=True, slots=True)
class Channel:
    """What to do with one channel's notifications.

    ``on_connected`` runs each time listening starts (catch up on what was committed
    while not listening), ``on_lost`` when the connection drops (notifications may be
    missed until it is back).
    """

    name: str
    on_notify: Callable[[str], None]
    on_connected: Callable[[], None] | None = None
    on_lost: Callable[[], None] | None = None


async def listen_forever(dsn: str, channels: Sequence[Channel], *, name: str) -> None:
    """Listen on every channel over one connection; reconnect with backoff.

    One connection per process, whatever the number of channels: each holds a
    PostgreSQL backend for the life of the process. Runs until cancelled.
    """
    backoff = 1.0
    while True:
        conn = None
        lost = asyncio.Event()
        try:
            conn = await asyncpg.connect(dsn)
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            for channel in channels:
                await conn.add_listener(channel.name, _callback(channel.on_notify))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            log.warning(
                "db.listen_failed", listener=name, error_type=type(exc).__name__, retry_in=backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            continue
        backoff = 1.0
        try:
            for channel in channels:
                if channel.on_connected is not None:
                    channel.on_connected()
            await lost.wait()
            log.warning("db.listen_connection_lost", listener=name)
            for channel in channels:
                if channel.on_lost is not None:
                    channel.on_lost()
        finally:
            with contextlib.suppress(Exception):
                await conn.close()


def _callback(on_notify: Callable[[str], None]) -> Callable[..., None]:
    def notified(*args: Any) -> None:  # (connection, pid, channel, payload)
        on_notify(str(args[3]))

    return notified
