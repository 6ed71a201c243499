"""Handlers by job kind. Later capabilities (media, push, webhooks) register here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from tellback_server.state import AppState


class RetryLater(Exception):
    """Raised by a handler to retry; ``delay`` (seconds) honours e.g. a provider's Retry-After."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class WaitOut(Exception):
    """Raised by a handler when what it needs is down (a push provider, the app's
    credentials for it), not because the job is bad: the job waits it out as a kind's
    ``waits_out`` errors do (no attempt spent, waiting longer the older the job is), and
    no sooner than ``delay`` seconds (a provider's Retry-After). The handler bounds how
    long by raising :class:`PermanentFailure` instead once waiting cannot help."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class PermanentFailure(Exception):
    """Raised by a handler when retrying cannot help; the job goes straight to ``failed``."""


@dataclass(frozen=True, slots=True)
class JobContext:
    job_id: UUID
    kind: str
    attempt: int
    max_attempts: int
    created_at: dt.datetime
    state: AppState


Handler = Callable[[JobContext, dict[str, Any]], Awaitable[None]]
# Called once when a job has failed for good (no attempt left, a PermanentFailure, the
# worker lost during the last attempt), with the reason: what the job was for is then
# given a visible end (an attachment ``rejected``, say) instead of waiting for good.
FailedHandler = Callable[[JobContext, dict[str, Any], str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class JobKind:
    handler: Handler
    max_attempts: int = 10
    timeout_s: float = 30.0
    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    # Errors meaning a dependency is down (object storage, say), not that this job is
    # bad: retried without spending an attempt, waiting longer the older the job is.
    waits_out: tuple[type[Exception], ...] = ()
    on_failed: FailedHandler | None = None


Periodic = Callable[["AppState"], Awaitable[Any]]


class JobRegistry:
    def __init__(self) -> None:
        self._kinds: dict[str, JobKind] = {}
        self._periodic: dict[str, tuple[float, Periodic]] = {}

    def periodic(self, name: str, interval_s: float, fn: Periodic) -> None:
        """Run ``fn(state)`` about every ``interval_s`` in each worker (it must be idempotent)."""
        self._periodic[name] = (interval_s, fn)

    def periodic_tasks(self) -> dict[str, tuple[float, Periodic]]:
        return dict(self._periodic)

    def register(
        self,
        kind: str,
        handler: Handler,
        *,
        max_attempts: int = 10,
        timeout_s: float = 30.0,
        base_delay_s: float = 1.0,
        max_delay_s: float = 300.0,
        waits_out: tuple[type[Exception], ...] = (),
        on_failed: FailedHandler | None = None,
    ) -> None:
        if kind in self._kinds:
            raise ValueError(f"job kind {kind!r} is already registered")
        self._kinds[kind] = JobKind(
            handler, max_attempts, timeout_s, base_delay_s, max_delay_s, waits_out, on_failed
        )

    def get(self, kind: str) -> JobKind | None:
        return self._kinds.get(kind)

    def kinds(self) -> list[str]:
        return sorted(self._kinds)
