"""Wire types of the webhook admin API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from msgspec import Meta, Struct

WebhookEventType = Literal[
    "conversation.created", "conversation.updated", "message.created", "attachment.updated"
]
Url = Annotated[str, Meta(min_length=1, max_length=2048, examples=["https://example.com/hooks"])]
Description = Annotated[str, Meta(max_length=200)]
EventFilter = Annotated[list[WebhookEventType], Meta(max_length=10)]


class WebhookCreate(Struct):
    url: Url
    # Empty: every event type, including types added later.
    events: EventFilter = msgspec.field(default_factory=list)
    description: Description | None = None


class WebhookUpdate(Struct, omit_defaults=True):
    url: Url | msgspec.UnsetType = msgspec.UNSET
    events: EventFilter | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType | None = msgspec.UNSET
    enabled: bool | msgspec.UnsetType = msgspec.UNSET


class WebhookOut(Struct):
    id: UUID
    app_id: UUID
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    # While set, deliveries are signed with the previous secret too.
    previous_secret_expires_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class WebhookCreated(WebhookOut):
    secret: str  # whsec_..., shown only here


class SecretRotate(Struct):
    # How long the old secret keeps signing alongside the new one (0: stop at once).
    overlap_seconds: Annotated[int, Meta(ge=0, le=7 * 24 * 3600)] = 24 * 3600


class SecretRotated(Struct):
    secret: str
    previous_secret_expires_at: dt.datetime | None


class WebhookAttemptOut(Struct):
    attempt: int
    status_code: int | None
    duration_ms: int
    error: str | None
    response_excerpt: str | None
    created_at: dt.datetime


class WebhookDeliveryOut(Struct):
    id: UUID
    endpoint_id: UUID
    event_id: str
    event_type: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_duration_ms: int | None
    next_attempt_at: dt.datetime | None
    delivered_at: dt.datetime | None
    created_at: dt.datetime


class WebhookDeliveryDetail(WebhookDeliveryOut):
    payload: dict[str, Any] | None
    attempt_log: list[WebhookAttemptOut]
