"""Admin API: an app's webhook endpoints and their delivery log."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.domain.webhooks.schemas import (
    SecretRotate,
    SecretRotated,
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveryDetail,
    WebhookDeliveryOut,
    WebhookOut,
    WebhookUpdate,
)
from tellback_server.domain.webhooks.services import WebhookService
from tellback_server.http import examples
from tellback_server.http.deps import ADMIN, ADMIN_AUTH, AdminPrincipal, app_state
from tellback_server.http.idempotency import IdempotencyKeyHeader, idempotent
from tellback_server.http.openapi import example_body
from tellback_server.http.pagination import DEFAULT_LIMIT, Limit, Page


def provide_webhooks(
    request: Request[Any, Any, Any], db: NamedDependency[AsyncSession]
) -> WebhookService:
    state = app_state(request)
    return WebhookService(db, state.sealer, allow_private=state.settings.webhook_allow_private)


class AdminWebhooksController(Controller):
    path = "/v1/admin/apps/{app_id:uuid}"
    tags = ["admin"]
    security = [{"adminToken": []}]
    dependencies = {**ADMIN, "webhooks": Provide(provide_webhooks, sync_to_thread=False)}
    middleware = ADMIN_AUTH

    @post(
        "/webhooks",
        status_code=201,
        response_model=WebhookCreated,
        summary="Add a webhook endpoint",
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[AsyncSession],
        admin: NamedDependency[AdminPrincipal],
        webhooks: NamedDependency[WebhookService],
        app_id: FromPath[UUID],
        data: Annotated[
            WebhookCreate,
            example_body("New feedback and replies to the helpdesk", examples.WEBHOOK_CREATE),
        ],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[bytes]:
        """Returns the signing `secret` (`whsec_...`), shown only here. `events` filters
        the types sent (empty: all). URLs resolving to loopback, private, link-local or
        metadata addresses are refused (422) unless the operator allows them."""
        return await idempotent(
            idempotency_key, request, db, admin.scope, 201, lambda _: webhooks.create(app_id, data)
        )

    @get("/webhooks", summary="List webhook endpoints")
    async def list_webhooks(
        self,
        admin: NamedDependency[AdminPrincipal],
        webhooks: NamedDependency[WebhookService],
        app_id: FromPath[UUID],
        cursor: FromQuery[str | None] = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> Page[WebhookOut]:
        return await webhooks.list(app_id, cursor, limit)

    @get("/webhooks/{webhook_id:uuid}", summary="Get a webhook endpoint")
    async def get_webhook(
        self,
        admin: NamedDependency[AdminPrincipal],
        webhooks: NamedDependency[WebhookService],
        app_id: FromPath[UUID],
        webhook_id: FromPath[UUID],
    ) -> WebhookOut:
        return await webhooks.get(app_id, webhook_id)

    @patch("/webhooks/{webhook_id:uuid}", summary="Change a webhook endpoint")
    async def update(
        self,
        admin: NamedDependency[AdminPrincipal],
        webhooks: NamedDependency[WebhookService],
        app_id: FromPath[UUID],
        webhook_id: FromPath[UUID],
        data: JSONBody[WebhookUpdate],
    ) -> WebhookOut:
        """A disabled endpoint gets no new deliveries; pending ones end as failed."""
        return await webhooks.update(app_id, webhook_id, data)

    @delete("/webhooks/{webhook_id:uuid}", status_code=204, summary="Remove a webhook endpoint")
    async def remove(
        self,
        admin: NamedDependency[AdminPrincipal],
        webhooks: NamedDependency[WebhookService],
        app_id: FromPath[UUID],
        webhook_id: FromPath[UUID],
    ) -> None:
        """Its delivery log goes with it."""
        await webhooks.delete(app_id, webhook_id)

    @post(
        "/webhooks/{webhook_id:uuid}/rotate-secret",
        status_code=200,
        summary="Issue a new signing secret",
    )
    async def rotate(
        self,
        admin: NamedDependency[AdminPrincipal],
        webhooks: NamedDependency[WebhookService],
        app_id: FromPath[UUID],
        webhook_id: FromPath[UUID],
        data: JSONBody[SecretRotate | None] = None,
    ) -> SecretRotated:
        """The new secret is shown once. For `overlap_seconds` (default 24 h) deliveries
        carry two signatures, old and new, so the receiver can switch at its own pace."""
        return await webhooks.rotate(app_id, webhook_id, data or SecretRotate())

    @get("/webhook-deliveries", summary="The webhook delivery log, newest first")
    async def deliveries(
        self,
        admin: NamedDependency[AdminPrincipal],
        webhooks: NamedDependency[WebhookService],
        app_id: FromPath[UUID],
        webhook_id: Annotated[
            UUID | None, QueryParameter(description="only this endpoint's deliveries")
        ] = None,
        status: Annotated[
            Literal["pending", "succeeded", "failed"] | None,
            QueryParameter(description="only deliveries in this state"),
        ] = None,
        cursor: FromQuery[str | None] = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> Page[WebhookDeliveryOut]:
        return await webhooks.deliveries(
            app_id, webhook_id=webhook_id, status=status, cursor=cursor, limit=limit
        )

    @get("/webhook-deliveries/{delivery_id:uuid}", summary="One delivery with every attempt")
    async def delivery(
        self,
        admin: NamedDependency[AdminPrincipal],
        webhooks: NamedDependency[WebhookService],
        app_id: FromPath[UUID],
        delivery_id: FromPath[UUID],
    ) -> WebhookDeliveryDetail:
        """The event as sent, and each attempt's status code, duration and an excerpt of
        the receiver's answer."""
        return await webhooks.delivery(app_id, delivery_id)

    @post(
        "/webhook-deliveries/{delivery_id:uuid}/replay",
        status_code=202,
        summary="Send a delivery again",
    )
    async def replay(
        self,
        admin: NamedDependency[AdminPrincipal],
        webhooks: NamedDependency[WebhookService],
        app_id: FromPath[UUID],
        delivery_id: FromPath[UUID],
    ) -> WebhookDeliveryOut:
        """For a delivery that has succeeded or failed: a fresh round of attempts with
        the same `webhook-id`, so receivers that de-duplicate still can. 409 while the
        delivery is still being attempted."""
        return await webhooks.replay(app_id, delivery_id)
