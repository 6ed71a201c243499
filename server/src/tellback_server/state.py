"""Everything a request or the worker needs, built once per process in ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tellback_server.db.engine import Database
from tellback_server.domain.events.broker import EventBroker
from tellback_server.http.auth_cache import PrincipalCache
from tellback_server.jobs.notify import JobNotifier
from tellback_server.metrics import Metrics
from tellback_server.ratelimit import RateLimiter, SharedLimits
from tellback_server.security import Sealer
from tellback_server.settings import Settings
from tellback_server.storage.base import ObjectStore


@dataclass
class AppState:
    settings: Settings
    db: Database
    metrics: Metrics
    sealer: Sealer
    notifier: JobNotifier
    store: ObjectStore
    events: EventBroker
    limiter: RateLimiter = field(default_factory=RateLimiter)
    # PostgreSQL: the limiter's counts shared with the other processes (ratelimit.py).
    shared_limits: SharedLimits | None = None
    # Recently verified session and agent tokens (hash -> ClientPrincipal or AgentPrincipal),
    # see http/auth_cache.py.
    principals: PrincipalCache[Any] = field(default_factory=lambda: PrincipalCache(0))
    # Per-process caches owned by capabilities (e.g. open push clients).
    extras: dict[str, Any] = field(default_factory=dict)
