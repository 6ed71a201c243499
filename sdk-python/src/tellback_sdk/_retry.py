"""The retry policy of sdk-spec/retries-and-idempotency.md as pure functions.

``should_retry`` answers "wait how long, or give up?" from the status (None: no
response at all), the response headers and the retry number, so shared JSON
test vectors can drive it without any HTTP.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# delay-seconds is digits (RFC 9110; a fraction is tolerated): never "inf", "nan", "1e9"
# or "-3", which float() would take. No wait is longer than a day.
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
MAX_RETRY_AFTER = 86400.0
IN_PROGRESS = "idempotency_key_in_progress"
SAFE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``base``/``cap`` shape the exponential backoff; ``max_retry_after`` caps a server's
    ``Retry-After`` for interactive calls, ``outbox_max_retry_after`` the pause the outbox
    keeps after one (None: the full time, as the spec asks; ``FlushResult.retry_after``
    still reports what the server asked). The outbox never sleeps on it: its flush stops
    and no flush sends before the pause has passed."""

    max_retries: int = 4
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float | None = 60.0
    outbox_max_retry_after: float | None = None
    # An outbox item the server itself fails on (a 5xx problem document that is not an
    # outage's 503) this many times, over at least this many seconds, is a dead letter:
    # it would otherwise block every later item for good (outbox.md).
    outbox_give_up_failures: int = 10
    outbox_give_up_seconds: float = 3600.0

    def with_retries(self, max_retries: int) -> RetryPolicy:
        return dataclasses.replace(self, max_retries=max_retries)

    def for_outbox(self) -> RetryPolicy:
        return dataclasses.replace(self, max_retry_after=self.outbox_max_retry_after)


DEFAULT_POLICY = RetryPolicy()


def parse_retry_after(headers: Mapping[str, str], now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (delay-seconds or an HTTP date), at most a
    day, or None when it is neither."""
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if _DELAY_SECONDS.fullmatch(raw):
        return min(float(raw), MAX_RETRY_AFTER)  # a 400-digit number is inf: a day
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return min(max(0.0, (when - now).total_seconds()), MAX_RETRY_AFTER)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def backoff_delay(
    attempt: int,
    policy: RetryPolicy = DEFAULT_POLICY,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """``min(cap, base * 2^(attempt-1)) * uniform(0.75, 1.25)``; attempt 1 is the first retry."""
    return float(min(policy.cap, policy.base * 2 ** (attempt - 1)) * uniform(0.75, 1.25))


def is_retryable_status(status: int | None, code: str | None = None) -> bool:
    """True for "no response", 408, 409 idempotency_key_in_progress, 429 and 5xx gateway codes."""
    if status is None:
        return True
    if status == 409:
        return code == IN_PROGRESS
    return status in RETRY_STATUSES


def should_retry(
    status: int | None,
    headers: Mapping[str, str],
    attempt: int,
    *,
    code: str | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    uniform: Callable[[float, float], float] = random.uniform,
    now: dt.datetime | None = None,
) -> float | None:
    """Seconds to wait before retry number ``attempt`` (1-based), or None to give up.

    ``status`` None means the request got no response (connection error or timeout).
    ``code`` is the problem document's code (needed to tell 409s apart).
    """
    if attempt > policy.max_retries or not is_retryable_status(status, code):
        return None
    if status is not None:
        retry_after = parse_retry_after(headers, now)
        if retry_after is not None:
            if policy.max_retry_after is not None:
                return min(retry_after, policy.max_retry_after)
            return retry_after
    return backoff_delay(attempt, policy, uniform)


def may_repeat(method: str, idempotency_key: str | None, safe: bool = False) -> bool:
    """Only requests that are safe to send twice are retried (a POST needs its key)."""
    return safe or method.upper() in SAFE_METHODS or idempotency_key is not None
