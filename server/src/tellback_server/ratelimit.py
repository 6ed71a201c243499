"""In-process GCRA rate limiter (per app and per end user).

Counters live in this process: with N API processes each admits the configured
rate, so the effective ceiling is N times it. A shared store (Redis) is the
documented next step for multi-node deployments.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict


class RateLimiter:
    def __init__(self, max_keys: int = 100_000, burst_seconds: float = 10.0) -> None:
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._max_keys = max_keys
        self._burst_seconds = burst_seconds

    def hit(self, key: str, per_minute: int, now: float | None = None) -> int | None:
        """Record one request; return None if allowed, else seconds to wait (>= 1)."""
        if per_minute <= 0:
            return None
        now = time.monotonic() if now is None else now
        interval = 60.0 / per_minute
        # Allow a burst of up to `burst_seconds` worth of requests (at least one).
        tolerance = max(interval, self._burst_seconds)
        tat = max(self._tat.get(key, now), now)
        if tat - now > tolerance:
            return max(1, math.ceil(tat - now - tolerance))
        self._tat[key] = tat + interval
        self._tat.move_to_end(key)
        if len(self._tat) > self._max_keys:
            self._tat.popitem(last=False)
        return None
