"""Webhook endpoints and their delivery log, for operators (the admin API)."""

from __future__ import annotations

import datetime as dt
from uuid import UUID

import msgspec
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.db.models import Event, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tellback_server.domain.apps.services import require_app
from tellback_server.domain.events.records import EVENT_COLUMNS, EventRecord
from tellback_server.domain.webhooks.delivery import secret_purpose
from tellback_server.domain.webhooks.outbox import JOB_KIND, SCHEDULE
from tellback_server.domain.webhooks.schemas import (
    SecretRotate,
    SecretRotated,
    WebhookAttemptOut,
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveryDetail,
    WebhookDeliveryOut,
    WebhookOut,
    WebhookUpdate,
)
from tellback_server.domain.webhooks.signing import new_secret
from tellback_server.domain.webhooks.ssrf import UnsafeUrl, resolve
from tellback_server.http.errors import AppError, NotFound, ValidationFailed
from tellback_server.http.pagination import Page, keyset_page
from tellback_server.jobs.queue import enqueue
from tellback_server.security import Sealer


class DeliveryPending(AppError):
    """A replay of a delivery whose attempts have not ended."""

    status_code, code = 409, "delivery_pending"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def webhook_out(ep: WebhookEndpoint) -> WebhookOut:
    rotating = ep.previous_secret_expires_at
    return WebhookOut(
        id=ep.id,
        app_id=ep.app_id,
        url=ep.url,
        events=list(ep.events or []),
        description=ep.description,
        enabled=ep.enabled,
        previous_secret_expires_at=rotating if rotating and rotating > _now() else None,
        created_at=ep.created_at,
        updated_at=ep.updated_at,
    )


def delivery_out(d: WebhookDelivery) -> WebhookDeliveryOut:
    return WebhookDeliveryOut(
        id=d.id,
        endpoint_id=d.endpoint_id,
        event_id=str(d.event_id),
        event_type=d.event_type,
        status=d.status,  # type: ignore[arg-type]
        attempts=d.attempts,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        last_duration_ms=d.last_duration_ms,
        next_attempt_at=d.next_attempt_at,
        delivered_at=d.delivered_at,
        created_at=d.created_at,
    )


class WebhookService:
    def __init__(self, db: AsyncSession, sealer: Sealer, *, allow_private: bool) -> None:
        self.db = db
        self.sealer = sealer
        self.allow_private = allow_private

    async def _endpoint(self, app_id: UUID, webhook_id: UUID) -> WebhookEndpoint:
        ep = await self.db.scalar(
            select(WebhookEndpoint).where(
                WebhookEndpoint.id == webhook_id, WebhookEndpoint.app_id == app_id
            )
        )
        if ep is None:
            raise NotFound("no such webhook")
        return ep

    async def _check_url(self, url: str) -> None:
        try:
            await resolve(url, allow_private=self.allow_private)
        except UnsafeUrl as exc:
            raise ValidationFailed.field("url", str(exc)) from None

    async def create(self, app_id: UUID, data: WebhookCreate) -> WebhookCreated:
        await require_app(self.db, app_id)
        await self._check_url(data.url)
        secret = new_secret()
        ep = WebhookEndpoint(
            app_id=app_id,
            url=data.url,
            events=sorted(set(data.events)),
            description=data.description,
            enabled=True,
            secret_sealed=b"",
        )
        self.db.add(ep)
        await self.db.flush()
        ep.secret_sealed = self.sealer.seal(secret.encode(), secret_purpose(ep.id))
        await self.db.flush()
        return WebhookCreated(**msgspec.structs.asdict(webhook_out(ep)), secret=secret)

    async def list(self, app_id: UUID, cursor: str | None, limit: int) -> Page[WebhookOut]:
        await require_app(self.db, app_id)
        stmt = select(WebhookEndpoint).where(WebhookEndpoint.app_id == app_id)
        rows, nxt = await keyset_page(
            self.db, stmt, WebhookEndpoint.created_at, WebhookEndpoint.id, cursor, limit
        )
        return Page(items=[webhook_out(r) for r in rows], next_cursor=nxt)

    async def get(self, app_id: UUID, webhook_id: UUID) -> WebhookOut:
        return webhook_out(await self._endpoint(app_id, webhook_id))

    async def update(self, app_id: UUID, webhook_id: UUID, data: WebhookUpdate) -> WebhookOut:
        ep = await self._endpoint(app_id, webhook_id)
        if data.url is not msgspec.UNSET:
            await self._check_url(data.url)
            ep.url = data.url
        if data.events is not msgspec.UNSET:
            ep.events = sorted(set(data.events))
        if data.description is not msgspec.UNSET:
            ep.description = data.description
        if data.enabled is not msgspec.UNSET:
            ep.enabled = data.enabled
            if not data.enabled:  # end what is waiting now, not at its next retry
                await self.db.execute(
                    update(WebhookDelivery)
                    .where(
                        WebhookDelivery.endpoint_id == ep.id, WebhookDelivery.status == "pending"
                    )
                    .values(
                        status="failed",
                        last_error="the endpoint was disabled",
                        next_attempt_at=None,
                        updated_at=_now(),
                    )
                )
        ep.updated_at = _now()
        await self.db.flush()
        return webhook_out(ep)

    async def delete(self, app_id: UUID, webhook_id: UUID) -> None:
        ep = await self._endpoint(app_id, webhook_id)
        await self.db.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == ep.id))

    async def rotate(self, app_id: UUID, webhook_id: UUID, data: SecretRotate) -> SecretRotated:
        ep = await self._endpoint(app_id, webhook_id)
        secret = new_secret()
        now = _now()
        if data.overlap_seconds > 0:
            ep.previous_secret_sealed = ep.secret_sealed
            ep.previous_secret_expires_at = now + dt.timedelta(seconds=data.overlap_seconds)
        else:
            ep.previous_secret_sealed = ep.previous_secret_expires_at = None
        ep.secret_sealed = self.sealer.seal(secret.encode(), secret_purpose(ep.id))
        ep.updated_at = now
        await self.db.flush()
        return SecretRotated(
            secret=secret, previous_secret_expires_at=ep.previous_secret_expires_at
        )

    async def deliveries(
        self,
        app_id: UUID,
        *,
        webhook_id: UUID | None,
        status: str | None,
        cursor: str | None,
        limit: int,
    ) -> Page[WebhookDeliveryOut]:
        await require_app(self.db, app_id)
        stmt = select(WebhookDelivery).where(WebhookDelivery.app_id == app_id)
        if webhook_id is not None:
            stmt = stmt.where(WebhookDelivery.endpoint_id == webhook_id)
        if status is not None:
            stmt = stmt.where(WebhookDelivery.status == status)
        rows, nxt = await keyset_page(
            self.db,
            stmt,
            WebhookDelivery.created_at,
            WebhookDelivery.id,
            cursor,
            limit,
            descending=True,
        )
        return Page(items=[delivery_out(r) for r in rows], next_cursor=nxt)

    async def _delivery(self, app_id: UUID, delivery_id: UUID) -> WebhookDelivery:
        d = await self.db.scalar(
            select(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.app_id == app_id
            )
        )
        if d is None:
            raise NotFound("no such webhook delivery")
        return d

    async def delivery(self, app_id: UUID, delivery_id: UUID) -> WebhookDeliveryDetail:
        d = await self._delivery(app_id, delivery_id)
        attempts = await self.db.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == d.id)
            .order_by(WebhookAttempt.created_at, WebhookAttempt.id)
        )
        row = (await self.db.execute(select(*EVENT_COLUMNS).where(Event.id == d.event_id))).first()
        payload = EventRecord.from_row(row).envelope(client=False) if row is not None else None
        return WebhookDeliveryDetail(
            **msgspec.structs.asdict(delivery_out(d)),
            payload=payload,
            attempt_log=[
                WebhookAttemptOut(
                    attempt=a.attempt,
                    status_code=a.status_code,
                    duration_ms=a.duration_ms,
                    error=a.error,
                    response_excerpt=a.response_excerpt,
                    created_at=a.created_at,
                )
                for a in attempts
            ],
        )

    async def replay(self, app_id: UUID, delivery_id: UUID) -> WebhookDeliveryOut:
        d = await self._delivery(app_id, delivery_id)
        now = _now()
        # One conditional UPDATE: of two concurrent replays only one starts a round.
        started = await self.db.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == d.id, WebhookDelivery.status != "pending")
            .values(status="pending", next_attempt_at=now, delivered_at=None, updated_at=now)
            .returning(WebhookDelivery.id)
        )
        if started.first() is None:
            raise DeliveryPending(
                "this delivery is still being attempted; replay it once it has ended"
            )
        await enqueue(self.db, JOB_KIND, {"delivery_id": str(d.id)}, max_attempts=len(SCHEDULE) + 1)
        await self.db.refresh(d)
        return delivery_out(d)
