"""Wire types for devices, push credentials and the delivery log."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal
from uuid import UUID

from msgspec import Meta, Struct

Token = Annotated[str, Meta(min_length=8, max_length=4096)]
Short = Annotated[str, Meta(max_length=100)]


class DeviceRegister(Struct, forbid_unknown_fields=True):
    platform: Literal["ios", "android"]
    push_provider: Literal["apns", "fcm"]
    push_token: Token
    apns_environment: Literal["sandbox", "production"] | None = None
    app_version: Short | None = None
    locale: Annotated[str, Meta(max_length=35)] | None = None


class AgentDeviceRegister(DeviceRegister, forbid_unknown_fields=True):
    """An agent's phone. `app_id` names the Tellback app whose push credentials reach it
    (typically the app your agents' phones run); `installation_id` tells one phone of
    the agent from another."""

    app_id: UUID | None = None
    installation_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")] = "default"


class DeviceOut(Struct):
    id: UUID
    platform: str
    push_provider: str
    push_token_suffix: str
    apns_environment: str | None
    app_version: str | None
    locale: str | None
    active: bool
    created_at: dt.datetime
    updated_at: dt.datetime


class ApnsCredentialsIn(Struct, forbid_unknown_fields=True):
    team_id: Annotated[str, Meta(pattern=r"^[A-Z0-9]{10}$")]
    key_id: Annotated[str, Meta(pattern=r"^[A-Z0-9]{10}$")]
    private_key: Annotated[str, Meta(min_length=100, max_length=10000)]
    topic: Annotated[str, Meta(min_length=1, max_length=255)]


class FcmCredentialsIn(Struct, forbid_unknown_fields=True):
    service_account: dict[str, Any]


class PushProviderStatus(Struct):
    provider: Literal["apns", "fcm"]
    configured: bool
    summary: str | None = None
    last_error: str | None = None
    last_error_at: dt.datetime | None = None
    last_success_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


class PushStatus(Struct):
    apns: PushProviderStatus
    fcm: PushProviderStatus


class PushDeliveryOut(Struct):
    id: UUID
    status: str
    provider: str | None
    audience: str
    device_id: UUID | None
    message_id: UUID | None
    conversation_id: UUID | None
    reason: str | None
    http_status: int | None
    latency_ms: float | None
    attempt: int
    created_at: dt.datetime
