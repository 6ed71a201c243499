"""Recently verified session and agent tokens, so a busy client's or agent's requests
skip the lookup.

A session or agent token is checked against the database once, then trusted for
``TELLBACK_AUTH_CACHE_SECONDS`` (default 5 s; never past the session's expiry)
in this process. What could make a cached answer wrong -- another user signing in
on the installation (which ends the previous user's sessions), an app's settings
changing, a user being erased, an agent disabled, renamed, given other apps or a
new token -- empties this process's cache when its transaction commits (the
``AUTH_CHANGED`` key, a commit hook). On PostgreSQL the same commit sends
``NOTIFY tellback_auth``, and every other process empties its cache when it
arrives (:meth:`PrincipalCache.channel`, on the process's LISTEN connection), a
few milliseconds later. A process that is not listening (its
connection lost) still trusts a check for no longer than the cache lifetime, and
empties its cache when it listens again.

A session's check also keeps what it read along: the end user as the views show
them (with their row's ``updated_at``) and whether the app had a webhook endpoint.
Changing those does not empty the cache: a new feedback that relies on them writes
only if they still hold, and reads them afresh otherwise
(``domain/conversations/services.py``, ``_create_alone``).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

from tellback_server.db.engine import notify
from tellback_server.db.listen import Channel

AUTH_CHANGED = "tellback_auth_changed"  # session.info: this transaction changed who may do what
NOTIFY_CHANNEL = "tellback_auth"  # payload: the committing process's instance

P = TypeVar("P")


def auth_changed(db: Session) -> None:
    """Mark the open transaction: cached principals are dropped when it commits, here
    and (PostgreSQL) in every other process."""
    db.info[AUTH_CHANGED] = True
    notify(db, NOTIFY_CHANNEL, str(db.info.get("instance", "")))


class PrincipalCache(Generic[P]):
    def __init__(self, seconds: float, max_entries: int = 100_000) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, P]] = {}
        # Counts the clears: a check read before one may already be stale, and is not kept.
        self.generation = 0

    def get(self, token_hash: str) -> P | None:
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._entries.pop(token_hash, None)
            return None
        return entry[1]

    def put(self, token_hash: str, principal: P, not_after: dt.datetime, generation: int) -> None:
        """Keep a check read when :attr:`generation` was ``generation``; not if the cache
        was cleared since (access may have changed after the row was read)."""
        if self.seconds <= 0 or generation != self.generation:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # a flood of distinct tokens: start over, stay bounded
        left = (not_after - dt.datetime.now(dt.UTC)).total_seconds()
        self._entries[token_hash] = (time.monotonic() + min(self.seconds, left), principal)

    def clear(self, _: object = None) -> None:
        self._entries.clear()
        self.generation += 1

    def channel(self, instance: str) -> Channel:
        """``NOTIFY tellback_auth`` from another process (``instance`` is this one's, whose
        commit hook already emptied the cache) empties this cache; so does listening
        again after the connection was lost, since a change may have been missed."""

        def on_notify(payload: str) -> None:
            if payload != instance:
                self.clear()

        return Channel(NOTIFY_CHANNEL, on_notify, on_connected=self.clear)
