"""Wire types for sessions, the end user and the SDK's configuration."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal
from uuid import UUID

from litestar.openapi.spec import OpenAPIType, Schema
from msgspec import UNSET, Meta, Struct, UnsetType

from tellback_server.domain.apps.schemas import CustomFieldDefinition
from tellback_server.domain.attachments.schemas import AttachmentConfig

Short = Annotated[str, Meta(max_length=100)]
InstallationId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{8,64}$")]
Email = Annotated[str, Meta(max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
AttrValue = str | int | float | bool | None
# Documented as one JSON type list: Litestar would render oneOf[string, integer,
# number, ...], under which every integer matches two branches (invalid).
_ATTRS_DOC = Meta(
    extra_json_schema={
        "extra": {
            "one_of": None,
            "type": OpenAPIType.OBJECT,
            "additional_properties": Schema(
                type=[OpenAPIType.STRING, OpenAPIType.NUMBER, OpenAPIType.BOOLEAN, OpenAPIType.NULL]
            ),
        }
    }
)
Attributes = Annotated[dict[str, AttrValue], _ATTRS_DOC]
AttributesUpdate = Annotated[
    dict[Annotated[str, Meta(min_length=1, max_length=64)], AttrValue], _ATTRS_DOC
]


class DeviceInfo(Struct, omit_defaults=True):
    """Device and app context captured by the SDK; unknown keys are ignored."""

    platform: Literal["ios", "android", "web", "other"] | None = None
    model: Short | None = None
    os_version: Short | None = None
    app_version: Short | None = None
    app_build: Short | None = None
    locale: Short | None = None
    timezone: Short | None = None
    sdk: Short | None = None


class SessionCreate(Struct):
    app_key: Annotated[str, Meta(min_length=1, max_length=64)]
    installation_id: InstallationId
    user_token: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    device: DeviceInfo | None = None


class EndUserOut(Struct):
    id: UUID
    external_id: str | None
    name: str | None
    email: str | None
    attributes: Attributes


class SessionCreated(Struct):
    session_token: str
    expires_at: dt.datetime
    user: EndUserOut


class MeUpdate(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=200)] | UnsetType | None = UNSET
    email: Email | UnsetType | None = UNSET
    attributes: AttributesUpdate | UnsetType = UNSET


class AppInfo(Struct):
    id: UUID
    name: str


class ClientConfig(Struct):
    app: AppInfo
    attachments: AttachmentConfig
    identity_mode: Literal["optional", "required"]
    categories: list[str]
    custom_fields: list[CustomFieldDefinition]
