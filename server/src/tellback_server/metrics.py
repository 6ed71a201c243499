"""Prometheus metrics, one registry per app instance (tests build many apps)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tellback_http_requests_total",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tellback_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.jobs = Counter(
            "tellback_jobs_total",
            "Job attempts this process ran, by kind and outcome (done, retried, failed, "
            "waiting: a dependency was down)",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.jobs_queued = Gauge(
            "tellback_jobs_queued",
            "Jobs waiting to run, by kind, across every worker (read from the database "
            "when scraped; includes jobs scheduled for later)",
            ["kind"],
            registry=self.registry,
        )
        self.jobs_oldest_due = Gauge(
            "tellback_jobs_oldest_due_seconds",
            "How long the longest-waiting due job has been due (0: none is), across "
            "every worker: the backlog to alert on",
            registry=self.registry,
        )
        self.jobs_read_at = Gauge(
            "tellback_jobs_backlog_read_timestamp_seconds",
            "When the two job gauges were last read from the database (Unix time): a "
            "scrape whose read failed or timed out keeps the figures before it",
            registry=self.registry,
        )

        self.sse_streams = Gauge(
            "tellback_sse_streams", "Open live event streams", registry=self.registry
        )
        self.sse_capped = Counter(
            "tellback_sse_streams_capped_total",
            "Live event streams a cap ended or refused, by stream (client, agent), action "
            "(ended: its holder's oldest, to make room for a new one; refused) and cap "
            "(end_user, agent, address, process)",
            ["stream", "action", "cap"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "tellback_webhook_attempts_total",
            "Webhook delivery attempts by outcome (succeeded, retried, failed, refused)",
            ["outcome"],
            registry=self.registry,
        )
        self.push = Counter(
            "tellback_push_attempts_total",
            "Push sends by provider, outcome (sent, retrying, failed, invalid_token) and "
            "reason: the provider's (Unregistered, QUOTA_EXCEEDED, ...) or the kind of "
            "failure (retry: unreachable or no answer; auth_error; setup_error)",
            ["provider", "outcome", "reason"],
            registry=self.registry,
        )
        self.commit_size = Histogram(
            "tellback_db_commit_size",
            "Requests whose writes one database commit carried, by kind: a SQLite write "
            "group, a PostgreSQL statement of new feedback",
            ["kind"],
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self._commit_children: dict[str, Any] = {}

        # (method, route, status) -> its counter and histogram children, which
        # ``labels()`` finds again on every call (under a lock, ~2 us a request).
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(method, route, str(status)),
                self.latency.labels(method, route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_commit(self, kind: str, requests: int) -> None:
        child = self._commit_children.get(kind)
        if child is None:
            child = self._commit_children[kind] = self.commit_size.labels(kind)
        child.observe(requests)

    def render(self) -> bytes:
        return generate_latest(self.registry)
