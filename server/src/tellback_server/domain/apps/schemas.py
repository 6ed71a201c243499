"""Wire types for apps and their settings."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal
from uuid import UUID

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

Name = Annotated[str, Meta(min_length=1, max_length=200)]
FieldKey = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Category = Annotated[str, Meta(min_length=1, max_length=100)]
OptionalIdentifier = Annotated[str, Meta(min_length=1, max_length=255)] | None


class CustomFieldDefinition(Struct, forbid_unknown_fields=True):
    """A field the app attaches to feedback, e.g. an order id or a plan name."""

    key: FieldKey
    type: Literal["string", "number", "integer", "boolean", "select", "multiselect"]
    label: str | None = None
    required: bool = False
    options: list[Annotated[str, Meta(min_length=1, max_length=100)]] | None = None
    max_length: Annotated[int, Meta(ge=1, le=10000)] | None = None


class RateLimits(Struct, forbid_unknown_fields=True):
    """Requests per minute: for the whole app, and for each end user (0 disables)."""

    app_per_minute: Annotated[int, Meta(ge=0, le=10_000_000)] = 6000
    user_per_minute: Annotated[int, Meta(ge=0, le=100_000)] = 120


MIB = 1024 * 1024
IMAGE_TYPES = ["image/jpeg", "image/png", "image/heic", "image/heif", "image/webp", "image/gif"]
VIDEO_TYPES = ["video/mp4", "video/quicktime"]
FILE_TYPES = ["text/plain", "application/json", "application/zip", "application/pdf"]
ContentType = Annotated[str, Meta(min_length=3, max_length=100)]


class KindLimits(Struct, forbid_unknown_fields=True):
    max_bytes: Annotated[int, Meta(ge=1, le=5 * 1024 * MIB)]
    content_types: list[ContentType]


class AttachmentLimits(Struct, forbid_unknown_fields=True):
    """Per kind: the largest accepted upload and the allowed content types."""

    photo: KindLimits = msgspec.field(default_factory=lambda: KindLimits(20 * MIB, IMAGE_TYPES))
    video: KindLimits = msgspec.field(default_factory=lambda: KindLimits(512 * MIB, VIDEO_TYPES))
    file: KindLimits = msgspec.field(default_factory=lambda: KindLimits(25 * MIB, FILE_TYPES))
    log: KindLimits = msgspec.field(default_factory=lambda: KindLimits(25 * MIB, FILE_TYPES))


class AppSettings(Struct, forbid_unknown_fields=True):
    identity_mode: Literal["optional", "required"] = "optional"
    categories: list[Category] = msgspec.field(default_factory=list)
    custom_fields: list[CustomFieldDefinition] = msgspec.field(default_factory=list)
    keep_photo_location: Annotated[
        bool,
        Meta(
            description="Keep where photos and videos were taken (a photo's EXIF GPS and"
            " XMP, a video's location tags and metadata tracks). Off by default:"
            " processing removes them."
        ),
    ] = False
    content_free_push: bool = False
    rate_limits: RateLimits = msgspec.field(default_factory=RateLimits)
    attachments: AttachmentLimits = msgspec.field(default_factory=AttachmentLimits)


class AppSettingsUpdate(Struct, forbid_unknown_fields=True):
    identity_mode: Literal["optional", "required"] | UnsetType = UNSET
    categories: list[Category] | UnsetType = UNSET
    custom_fields: list[CustomFieldDefinition] | UnsetType = UNSET
    keep_photo_location: bool | UnsetType = UNSET
    content_free_push: bool | UnsetType = UNSET
    rate_limits: RateLimits | UnsetType = UNSET
    attachments: AttachmentLimits | UnsetType = UNSET


class AppCreate(Struct, forbid_unknown_fields=True):
    name: Name
    bundle_id: OptionalIdentifier = None
    android_package: OptionalIdentifier = None
    settings: AppSettings | None = None


class AppUpdate(Struct, forbid_unknown_fields=True):
    name: Name | UnsetType = UNSET
    bundle_id: OptionalIdentifier | UnsetType = UNSET
    android_package: OptionalIdentifier | UnsetType = UNSET
    settings: AppSettingsUpdate | UnsetType = UNSET


class AppOut(Struct):
    id: UUID
    name: str
    bundle_id: str | None
    android_package: str | None
    app_key: str
    previous_app_key: str | None
    identity_kids: list[str]
    settings: AppSettings
    created_at: dt.datetime
    updated_at: dt.datetime


class AppCreated(AppOut):
    """Returned once at creation: ``identity_secret`` is never shown again."""

    identity_secret: str = ""
    identity_kid: str = ""


class RotateKeys(Struct, forbid_unknown_fields=True):
    identity_secret: bool = True
    app_key: bool = False
    revoke_previous: bool = False


class KeysRotated(Struct):
    app_key: str
    previous_app_key: str | None
    identity_kids: list[str]
    identity_secret: str | None = None
    identity_kid: str | None = None
