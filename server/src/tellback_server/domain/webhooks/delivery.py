"""Sending one webhook delivery (the ``webhook.deliver`` job).

Each attempt is a signed POST with a deadline, to the address the SSRF guard
just approved, never following redirects and reading at most a small excerpt
of the answer. Any 2xx is success; anything else (or no answer) is retried on
:data:`SCHEDULE` for about 24 hours, then the delivery is ``failed``. Every
attempt is written to the delivery log. Delivery is at least once: a worker
killed after the POST resends it, with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import structlog
from sqlalchemy import select, update

from tellback_server.db.models import Event, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tellback_server.domain.events.records import EVENT_COLUMNS, EventRecord
from tellback_server.domain.webhooks.outbox import JOB_KIND, SCHEDULE
from tellback_server.domain.webhooks.signing import signature_header
from tellback_server.domain.webhooks.ssrf import UnsafeUrl, parse_url, resolve
from tellback_server.jobs.registry import JobContext, JobRegistry, PermanentFailure, RetryLater
from tellback_server.security import Sealer
from tellback_server.state import AppState

log = structlog.get_logger("tellback.webhooks")

EXCERPT_BYTES = 1024
MAX_RETRY_AFTER_S = 3600.0
USER_AGENT = "Tellback-Webhooks/1"
_CLIENT_KEY = "webhooks.http"


def secret_purpose(endpoint_id: UUID) -> str:
    return f"webhook-secret:{endpoint_id}"


@dataclass(frozen=True, slots=True)
class Outcome:
    status_code: int | None
    duration_ms: int
    error: str | None
    excerpt: str | None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# Clients kept, one per host name: a delivery connects to the address it checked, so a
# shared pool (keyed by that address) could carry a request for one name over a
# connection whose TLS certificate was verified for another name on the same address.
MAX_CLIENTS = 64
_RETIRED_KEY = "webhooks.http.retired"
RETIRE_MARGIN_S = 30.0  # an evicted client is closed this long after a send's deadline


async def http_client(state: AppState, hostname: str) -> httpx.AsyncClient:
    """The client for deliveries to ``hostname`` (its connections kept alive). Past
    MAX_CLIENTS names the least recently used client is retired, and closed once any
    send it carried is past its deadline."""
    clients: OrderedDict[str, httpx.AsyncClient] = state.extras.setdefault(
        _CLIENT_KEY, OrderedDict()
    )
    retired: list[tuple[float, httpx.AsyncClient]] = state.extras.setdefault(_RETIRED_KEY, [])
    now = time.monotonic()
    while retired and retired[0][0] <= now:
        await retired.pop(0)[1].aclose()
    client = clients.get(hostname)
    if client is not None:
        clients.move_to_end(hostname)
        return client
    client = clients[hostname] = httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,  # an operator's HTTP(S)_PROXY must not bypass the address check
        limits=httpx.Limits(max_connections=20, max_keepalive_connections=5),
    )
    while len(clients) > MAX_CLIENTS:
        later = now + state.settings.webhook_timeout_seconds + RETIRE_MARGIN_S
        retired.append((later, clients.popitem(last=False)[1]))
    return client


async def close_http_client(state: AppState) -> None:
    clients: OrderedDict[str, httpx.AsyncClient] = state.extras.pop(_CLIENT_KEY, OrderedDict())
    retired: list[tuple[float, httpx.AsyncClient]] = state.extras.pop(_RETIRED_KEY, [])
    for client in [*clients.values(), *(c for _, c in retired)]:
        await client.aclose()


def active_secrets(endpoint: WebhookEndpoint, sealer: Sealer, now: dt.datetime) -> list[str]:
    purpose = secret_purpose(endpoint.id)
    keys = [sealer.open(endpoint.secret_sealed, purpose).decode()]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret_sealed is not None and expires is not None and expires > now:
        keys.append(sealer.open(endpoint.previous_secret_sealed, purpose).decode())
    return keys


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), MAX_RETRY_AFTER_S))
    except ValueError:
        return None


async def post(state: AppState, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
    """One attempt: resolve and check the host, POST to that address, read an excerpt."""
    settings = state.settings
    started = time.perf_counter()

    def took() -> int:
        return round((time.perf_counter() - started) * 1000)

    timeout = settings.webhook_timeout_seconds
    # One deadline for the whole attempt, the name's lookup included.
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            addrs = await resolve(url, allow_private=settings.webhook_allow_private)
    except UnsafeUrl as exc:
        return Outcome(None, took(), f"refused: {exc}"[:500], None)
    except TimeoutError:
        return Outcome(None, took(), f"the host's name did not resolve within {timeout:g} s", None)
    parts = parse_url(url)
    target, extensions = url, {}
    send_headers = {**headers, "user-agent": USER_AGENT, "accept-encoding": "identity"}
    if not settings.webhook_allow_private:
        # Connect to the address just checked; Host and TLS SNI keep the original name.
        ip = addrs[0]
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        target = parts._replace(netloc=netloc).geturl()
        send_headers["host"] = parts.netloc
        extensions = {"sni_hostname": parts.hostname}
    response: httpx.Response | None = None
    excerpt = bytearray()
    client = await http_client(state, parts.hostname or "")
    try:
        async with asyncio.timeout_at(deadline):
            async with client.stream(
                "POST",
                target,
                content=body,
                headers=send_headers,
                timeout=timeout,
                extensions=extensions,
            ) as response:
                async for chunk in response.aiter_raw():
                    excerpt += chunk
                    if len(excerpt) >= EXCERPT_BYTES:
                        break
    except (TimeoutError, httpx.HTTPError) as exc:
        # The status line is the answer: a receiver that said 2xx and then trickled or
        # broke off its body has the event, and sending it again would duplicate it.
        if response is None:
            if isinstance(exc, TimeoutError):
                return Outcome(None, took(), f"no answer within {timeout:g} s", None)
            reason = f"{type(exc).__name__}: {exc}".replace("\x00", "")
            return Outcome(None, took(), reason[:500], None)
    # PostgreSQL text cannot hold NUL: a binary answer must not break the log write.
    text = bytes(excerpt[:EXCERPT_BYTES]).decode("utf-8", "replace").replace("\x00", "\ufffd")
    code = response.status_code
    error = None
    if 300 <= code < 400:
        error = f"answered {code}; redirects are not followed"
    elif not 200 <= code < 300:
        error = f"answered {code}"
    return Outcome(code, took(), error, text, _retry_after(response.headers.get("retry-after")))


async def _load(
    state: AppState, delivery_id: UUID
) -> tuple[WebhookDelivery, WebhookEndpoint, EventRecord] | None:
    async with state.db.session(write=False) as db:
        found = (
            await db.execute(
                select(WebhookDelivery, WebhookEndpoint)
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .where(WebhookDelivery.id == delivery_id)
            )
        ).first()
        if found is None:
            return None
        delivery, endpoint = found
        row = (
            await db.execute(select(*EVENT_COLUMNS).where(Event.id == delivery.event_id))
        ).first()
    if row is None:
        return None
    return delivery, endpoint, EventRecord.from_row(row)


async def _record(
    state: AppState, delivery_id: UUID, attempt: int, outcome: Outcome, status: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    async with state.db.session(write=True) as db:
        db.add(
            WebhookAttempt(
                delivery_id=delivery_id,
                attempt=attempt,
                status_code=outcome.status_code,
                duration_ms=outcome.duration_ms,
                error=outcome.error,
                response_excerpt=outcome.excerpt,
            )
        )
        await db.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(
                status=status,
                attempts=WebhookDelivery.attempts + 1,
                last_status_code=outcome.status_code,
                last_error=outcome.error,
                last_duration_ms=outcome.duration_ms,
                delivered_at=now if status == "succeeded" else None,
                next_attempt_at=None,
                updated_at=now,
            )
        )


async def deliver(ctx: JobContext, payload: dict[str, Any]) -> None:
    state = ctx.state
    delivery_id = UUID(str(payload["delivery_id"]))
    loaded = await _load(state, delivery_id)
    if loaded is None:
        return  # the endpoint, its app or the event is gone: nothing left to send
    delivery, endpoint, record = loaded
    if delivery.status != "pending":
        return  # a duplicate job after a lost lease, or ended (endpoint disabled)
    structlog.contextvars.bind_contextvars(webhook_delivery_id=str(delivery_id))
    if not endpoint.enabled:
        outcome = Outcome(None, 0, "the endpoint is disabled", None)
        await _record(state, delivery_id, delivery.attempts + 1, outcome, "failed")
        raise PermanentFailure("webhook endpoint disabled")
    now = dt.datetime.now(dt.UTC)
    msg_id, timestamp = str(record.id), int(now.timestamp())
    body = json.dumps(record.envelope(client=False), separators=(",", ":")).encode()
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(
            active_secrets(endpoint, state.sealer, now), msg_id, timestamp, body
        ),
    }
    outcome = await post(state, endpoint.url, body, headers)
    last = ctx.attempt >= min(ctx.max_attempts, len(SCHEDULE) + 1)
    status = "succeeded" if outcome.ok else ("failed" if last else "pending")
    await _record(state, delivery_id, delivery.attempts + 1, outcome, status)
    state.metrics.webhooks.labels(
        "succeeded" if outcome.ok else ("failed" if last else "retried")
    ).inc()
    if outcome.ok:
        log.info("webhooks.delivered", status_code=outcome.status_code, ms=outcome.duration_ms)
        return
    log.warning("webhooks.attempt_failed", attempt=ctx.attempt, error=outcome.error, final=last)
    if last:
        raise PermanentFailure(outcome.error or "failed")
    # Jitter only shortens a wait, so the whole schedule stays inside 24 hours.
    delay = SCHEDULE[min(ctx.attempt, len(SCHEDULE)) - 1] * random.uniform(0.8, 1.0)  # noqa: S311
    if outcome.retry_after is not None:
        delay = max(delay, outcome.retry_after)
    await _set_next(state, delivery_id, delay)
    raise RetryLater(outcome.error or "failed", delay=delay)


async def _set_next(state: AppState, delivery_id: UUID, delay: float) -> None:
    async with state.db.session(write=True) as db:
        await db.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(next_attempt_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay))
        )


def register(registry: JobRegistry) -> None:
    # The schedule comes from the handler (RetryLater.delay); the worker's own backoff
    # is kept below it so it never stretches the 24-hour window.
    registry.register(
        JOB_KIND,
        deliver,
        max_attempts=len(SCHEDULE) + 1,
        timeout_s=120.0,
        base_delay_s=1.0,
        max_delay_s=1.0,
    )
