"""A process's PostgreSQL ``LISTEN`` connection, held for as long as the process runs."""

from __future__ import annotations

import asyncio
import contextlib
import time
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


# A connection silently gone (a NAT timeout, a failover) is found by a ping this often,
# answered within PING_TIMEOUT seconds.
PING_SECONDS = 30.0
PING_TIMEOUT = 5.0
APPLICATION_NAME = "tellback listen"


async def listen_forever(dsn: str, channels: Sequence[Channel], *, name: str) -> None:
    """Listen on every channel over one connection; reconnect with backoff.

    One connection per process, whatever the number of channels: each holds a
    PostgreSQL backend for the life of the process. Nothing but cancellation ends it:
    any failure (connecting, listening, a connection that stops answering its ping
    every ``PING_SECONDS``) is logged and listening starts over. Runs until cancelled.
    """
    backoff = 1.0
    while True:
        began = time.monotonic()
        try:
            await _listen_once(dsn, channels, name)
        except Exception as exc:  # noqa: BLE001 (every failure: log, wait, start over)
            log.warning(
                "db.listen_failed", listener=name, error_type=type(exc).__name__, retry_in=backoff
            )
        else:
            if time.monotonic() - began > 10:  # it had listened a while: again at once
                backoff = 1.0
                continue
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 30.0)


async def _listen_once(dsn: str, channels: Sequence[Channel], name: str) -> None:
    """One connection's life: returns when it is lost, raises if it cannot listen."""
    lost = asyncio.Event()
    # Named, so that operators (and tests) see it in pg_stat_activity for what it is.
    conn = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
    listening = False
    try:
        conn.add_termination_listener(lambda _c: lost.set())
        for channel in channels:
            await conn.add_listener(channel.name, _callback(channel.on_notify, name))
        listening = True
        # Each time, so an operator sees listening come back after `db.listen_failed` or
        # `db.listen_connection_lost` (a PostgreSQL restart, a failover).
        log.info("db.listening", listener=name, channels=[c.name for c in channels])
        for channel in channels:
            if channel.on_connected is not None:
                _safely(channel.on_connected, name)
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), PING_SECONDS)
                break
            try:
                await conn.execute("SELECT 1", timeout=PING_TIMEOUT)
            except Exception:  # noqa: BLE001 (whatever the reason, it no longer answers)
                break
    except asyncio.CancelledError:
        listening = False  # (the process is stopping: nothing was lost)
        raise
    finally:
        conn.terminate()  # (no round trip to wait for, nothing to cancel)
        if listening:  # (lost, or failed in a way of its own: what it heard stops here)
            log.warning("db.listen_connection_lost", listener=name)
            for channel in channels:
                if channel.on_lost is not None:
                    _safely(channel.on_lost, name)


def _safely(callback: Callable[[], None], name: str) -> None:
    try:
        callback()
    except Exception:
        log.exception("db.listen_callback_failed", listener=name)


def _callback(on_notify: Callable[[str], None], name: str) -> Callable[..., None]:
    def notified(*args: Any) -> None:  # (connection, pid, channel, payload)
        _safely(lambda: on_notify(str(args[3])), name)

    return notified
