"""Rate limits: GCRA per key (an app, an end user, a client address), shared by processes.

Every process decides alone, from its own table of theoretical arrival times
(TATs): a request never waits on a round trip for its limit. Alone, N API
processes would each admit the configured rate. On PostgreSQL they share one
account (:class:`SharedLimits`): every ``TELLBACK_RATE_LIMIT_SYNC_SECONDS`` each
process sends, in one statement, how far it moved each key's TAT since it last
did, and reads back each of those keys' shared TAT, which holds every process's
admissions. A process learns the others' admissions one sync late, so:

- over any span, all processes together admit the configured rate, as one would;
- within one sync interval, each process may admit what it saw room for, so a
  key flooded on N processes at once can get up to N bursts in its first interval
  (and later up to N-1 intervals' worth more than its burst at a time), after
  which the shared TAT holds every process back until the rate catches up.

The shared table is UNLOGGED (no WAL, not replicated: a failover starts the
counts over) and holds keyed hashes, not the keys: client addresses are not
stored. A sync that fails (the database down) keeps its counts for the next one,
and each process meanwhile limits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from tellback_server.http.errors import brief_db_error

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

log = structlog.get_logger("tellback.ratelimit")


class RateLimiter:
    def __init__(self, max_keys: int = 100_000, burst_seconds: float = 10.0) -> None:
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._max_keys = max_keys
        self._burst_seconds = burst_seconds
        # Shared (see SharedLimits): key -> seconds this process moved its TAT since the
        # last sync took them. A key refused here is kept too (at 0), so that the next
        # sync reads what the others admitted. None while nothing shares.
        self._pending: dict[str, float] | None = None

    def hit(self, key: str, per_minute: int, now: float | None = None) -> int | None:
        """Record one request; return None if allowed, else seconds to wait (>= 1)."""
        if per_minute <= 0:
            return None
        now = time.monotonic() if now is None else now
        interval = 60.0 / per_minute
        # Allow a burst of up to `burst_seconds` worth of requests (at least one).
        tolerance = max(interval, self._burst_seconds)
        tat = max(self._tat.get(key, now), now)
        pending = self._pending
        if tat - now > tolerance:
            if pending is not None and key not in pending:
                pending[key] = 0.0
            return max(1, math.ceil(tat - now - tolerance))
        self._tat[key] = tat + interval
        self._tat.move_to_end(key)
        if len(self._tat) > self._max_keys:
            self._tat.popitem(last=False)
        if pending is not None:
            pending[key] = pending.get(key, 0.0) + interval
        return None

    def refund(self, key: str, per_minute: int) -> None:
        """Take back one request :meth:`hit` admitted for ``key``, which another limit
        then refused: what was not served is not counted."""
        if per_minute <= 0 or key not in self._tat:
            return
        interval = 60.0 / per_minute
        self._tat[key] -= interval
        if self._pending is not None and key in self._pending:
            self._pending[key] -= interval

    # ----- sharing (SharedLimits) ----------------------------------------------------------

    def share(self) -> None:
        """Start keeping what each key admitted, for :meth:`take_pending`."""
        if self._pending is None:
            self._pending = {}

    def take_pending(self) -> dict[str, float]:
        """What was admitted per key (seconds of TAT) since the last call; starts over."""
        taken, self._pending = self._pending or {}, {}
        return taken

    def give_back(self, taken: dict[str, float]) -> None:
        """A sync failed: its counts go with the next one."""
        pending = self._pending
        assert pending is not None
        for key, debt in taken.items():
            pending[key] = pending.get(key, 0.0) + debt

    def merge(self, ahead: dict[str, float], sent_at: float) -> None:
        """Take the shared account: key -> how far its shared TAT was past the database's
        clock when the sync (sent at ``sent_at``, this process's monotonic clock) ran.
        It holds what this process sent; what it admitted since is added back."""
        pending = self._pending or {}
        for key, seconds in ahead.items():
            self._tat[key] = sent_at + max(seconds, 0.0) + pending.get(key, 0.0)
            self._tat.move_to_end(key)
        while len(self._tat) > self._max_keys:
            self._tat.popitem(last=False)


# One statement per sync: add each key's debt to its shared TAT (which first catches up
# with the clock, as GCRA's max(tat, now) does) and read back how far ahead it is now.
# Keys go in sorted, so two processes' syncs lock shared rows in one order (no deadlock).
_SYNC = text(
    """
    INSERT INTO rate_limits AS r (key, tat)
    SELECT u.key, extract(epoch FROM statement_timestamp()) + u.debt
    FROM unnest(CAST(:keys AS bytea[]), CAST(:debts AS float8[])) AS u(key, debt)
    ON CONFLICT (key) DO UPDATE
    SET tat = greatest(r.tat, extract(epoch FROM statement_timestamp()))
        + (excluded.tat - extract(epoch FROM statement_timestamp()))
    RETURNING r.key, r.tat - extract(epoch FROM statement_timestamp()) AS ahead
    """
)
# A TAT in the past is the same as no row. Rows a sync holds are skipped, not waited for:
# a sync may wait for a prune, but never the other way round, so they cannot deadlock.
_PRUNE = text(
    """
    DELETE FROM rate_limits WHERE key IN (
        SELECT key FROM rate_limits
        WHERE tat < extract(epoch FROM statement_timestamp())
        FOR UPDATE SKIP LOCKED
    )
    """
)


class SharedLimits:
    """Syncs a process's :class:`RateLimiter` with the others' through PostgreSQL."""

    def __init__(
        self,
        limiter: RateLimiter,
        engine: AsyncEngine,
        secret_key: str,
        *,
        every: float,
        prune_every: float = 60.0,
    ) -> None:
        self._limiter = limiter
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        # Keys are stored as keyed hashes: a client address is not written to the database.
        self._hash_key = hashlib.sha256(b"tellback rate limits\0" + secret_key.encode()).digest()
        self._every = every
        self._prune_every = prune_every
        self._pruned_at = time.monotonic()
        self._failing = False
        limiter.share()

    def _digest(self, key: str) -> bytes:
        return hashlib.blake2b(key.encode(), digest_size=16, key=self._hash_key).digest()

    async def sync(self) -> None:
        """Send what this process admitted since the last sync; take the shared account."""
        taken = self._limiter.take_pending()
        if not taken:
            return
        names = {self._digest(key): key for key in taken}
        digests = sorted(names)
        sent_at = time.monotonic()
        try:
            async with self._engine.connect() as conn:
                result = await conn.execute(
                    _SYNC, {"keys": digests, "debts": [taken[names[d]] for d in digests]}
                )
                rows = result.all()
        except Exception as exc:
            # Sent again with the next sync. Had it committed before its answer was lost,
            # these counts are then counted twice: stricter for a moment, never looser.
            self._limiter.give_back(taken)
            if not self._failing:
                self._failing = True
                log.warning("ratelimit.sync_failed", error=brief_db_error(exc))
            raise
        if self._failing:
            self._failing = False
            log.info("ratelimit.sync_recovered")
        self._limiter.merge({names[bytes(d)]: float(a) for d, a in rows}, sent_at)
        if sent_at - self._pruned_at >= self._prune_every:
            self._pruned_at = sent_at
            await self._prune()

    async def _prune(self) -> None:
        """Drop the keys whose time has passed; a failure waits for the next prune."""
        try:
            async with self._engine.connect() as conn:
                await conn.execute(_PRUNE)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:  # the database away
            log.warning("ratelimit.prune_failed", error=brief_db_error(exc))

    async def run(self, stop: asyncio.Event) -> None:
        """Sync every ``every`` seconds until ``stop`` is set, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._every)
            with contextlib.suppress(Exception):  # logged in sync; the next one retries
                await self.sync()
