"""Typed responses (and a few request shapes) of the client API.

Decoding ignores fields this SDK does not know, and enum-like fields
(``status``, ``kind``, ``type``) are plain ``str`` so a value added in a later
server version stays readable instead of failing (sdk-spec/README.md).
IDs are opaque strings.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Generic, TypeVar

import msgspec
from msgspec import Struct

T = TypeVar("T")

__all__ = [
    "AppInfo",
    "Attachment",
    "AttachmentLimits",
    "Author",
    "ClientConfig",
    "Conversation",
    "CustomFieldDefinition",
    "Device",
    "DeviceInfo",
    "KindLimits",
    "Location",
    "Message",
    "PageBody",
    "Unread",
    "UploadCreated",
    "UploadStatus",
    "UploadedPart",
    "User",
]


class User(Struct, kw_only=True):
    id: str
    external_id: str | None = None
    name: str | None = None
    email: str | None = None
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)


class SessionCreated(Struct, kw_only=True):
    session_token: str
    expires_at: dt.datetime
    user: User


class DeviceInfo(Struct, kw_only=True, omit_defaults=True):
    """What the SDK reports about the device when it starts a session."""

    platform: str | None = None  # ios | android | web | other
    model: str | None = None
    os_version: str | None = None
    app_version: str | None = None
    app_build: str | None = None
    locale: str | None = None
    timezone: str | None = None
    sdk: str | None = None


class Location(Struct, kw_only=True, omit_defaults=True):
    latitude: float
    longitude: float
    accuracy_m: float | None = None
    altitude_m: float | None = None
    captured_at: dt.datetime | None = None
    label: str | None = None


class Author(Struct, kw_only=True):
    type: str  # user | agent | system
    id: str | None = None
    name: str | None = None


class Attachment(Struct, kw_only=True):
    id: str
    kind: str
    filename: str
    content_type: str
    size: int
    status: str  # pending | processing | ready | rejected | expired | aborted
    reason: str | None = None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    url: str | None = None
    thumbnail_url: str | None = None
    expires_at: dt.datetime | None = None
    created_at: dt.datetime | None = None


class Message(Struct, kw_only=True):
    id: str
    conversation_id: str
    author: Author
    body: str | None = None
    attachments: list[Attachment] = msgspec.field(default_factory=list)
    location: Location | None = None
    created_at: dt.datetime


class Conversation(Struct, kw_only=True):
    id: str
    status: str  # open | pending | solved | closed
    subject: str | None = None
    category: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    custom_fields: dict[str, Any] = msgspec.field(default_factory=dict)
    location: Location | None = None
    created_at: dt.datetime
    updated_at: dt.datetime
    last_message: Message | None = None
    unread_count: int = 0


class Unread(Struct, kw_only=True):
    unread_count: int


class KindLimits(Struct, kw_only=True):
    max_bytes: int
    content_types: list[str]


class AttachmentLimits(Struct, kw_only=True):
    photo: KindLimits
    video: KindLimits
    file: KindLimits
    log: KindLimits
    multipart_threshold_bytes: int = 16 * 1024 * 1024

    def for_kind(self, kind: str) -> KindLimits | None:
        limits = getattr(self, kind, None)
        return limits if isinstance(limits, KindLimits) else None


class CustomFieldDefinition(Struct, kw_only=True):
    key: str
    type: str
    label: str | None = None
    required: bool = False
    options: list[str] | None = None
    max_length: int | None = None


class AppInfo(Struct, kw_only=True):
    id: str
    name: str


class ClientConfig(Struct, kw_only=True):
    app: AppInfo
    attachments: AttachmentLimits
    identity_mode: str = "optional"
    categories: list[str] = msgspec.field(default_factory=list)
    custom_fields: list[CustomFieldDefinition] = msgspec.field(default_factory=list)


class Device(Struct, kw_only=True):
    id: str
    platform: str
    push_provider: str
    push_token_suffix: str
    apns_environment: str | None = None
    app_version: str | None = None
    locale: str | None = None
    active: bool = True
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


class PartUrl(Struct, kw_only=True):
    part_number: int
    url: str


class SinglePlan(Struct, kw_only=True):
    url: str
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class MultipartPlan(Struct, kw_only=True):
    part_size: int
    part_count: int
    parts: list[PartUrl]


class UploadCreated(Struct, kw_only=True):
    upload_id: str
    expires_at: dt.datetime
    method: str  # single | multipart
    single: SinglePlan | None = None
    multipart: MultipartPlan | None = None


class UploadedPart(Struct, kw_only=True):
    part_number: int
    etag: str
    size: int


class UploadStatus(Struct, kw_only=True):
    upload_id: str
    status: str
    size: int
    method: str
    expires_at: dt.datetime
    uploaded_parts: list[UploadedPart] = msgspec.field(default_factory=list)
    reason: str | None = None
    single: SinglePlan | None = None
    multipart: MultipartPlan | None = None


class PageBody(Struct, Generic[T], kw_only=True):
    items: list[T]
    next_cursor: str | None = None
