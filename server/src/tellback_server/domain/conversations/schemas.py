"""Wire types for conversations (feedback) and messages."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from tellback_server.domain.attachments.schemas import AttachmentOut
from tellback_server.domain.identity.schemas import EndUserOut

Body = Annotated[str, Meta(min_length=1, max_length=10000)]
Tag = Annotated[str, Meta(min_length=1, max_length=50)]
Tags = Annotated[list[Tag], Meta(max_length=20)]
AttachmentIds = Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=20)]
Status = Literal["open", "pending", "solved", "closed"]
Priority = Literal["low", "normal", "high", "urgent"]


class Location(Struct, omit_defaults=True):
    latitude: Annotated[float, Meta(ge=-90, le=90)]
    longitude: Annotated[float, Meta(ge=-180, le=180)]
    accuracy_m: Annotated[float, Meta(ge=0, le=1e7)] | None = None
    altitude_m: Annotated[float, Meta(ge=-1e5, le=1e6)] | None = None
    captured_at: (
        Annotated[
            dt.datetime,
            Meta(
                description="When the position was taken. Stored and answered in UTC; a"
                " time without an offset is taken as UTC."
            ),
        ]
        | None
    ) = None
    label: Annotated[str, Meta(max_length=200)] | None = None


class Context(Struct, omit_defaults=True):
    """Device and app context captured automatically by the SDK."""

    app: dict[str, Any] = msgspec.field(default_factory=dict)
    device: dict[str, Any] = msgspec.field(default_factory=dict)
    network: dict[str, Any] = msgspec.field(default_factory=dict)
    battery: dict[str, Any] = msgspec.field(default_factory=dict)
    storage: dict[str, Any] = msgspec.field(default_factory=dict)
    extra: dict[str, Any] = msgspec.field(default_factory=dict)


class ConversationCreate(Struct):
    body: Body
    subject: Annotated[str, Meta(max_length=300)] | None = None
    category: Annotated[str, Meta(max_length=100)] | None = None
    tags: Tags = msgspec.field(default_factory=list)
    custom_fields: dict[str, Any] = msgspec.field(default_factory=dict)
    context: Context | None = None
    attachment_ids: AttachmentIds = msgspec.field(default_factory=list)
    location: Location | None = None


class MessageCreate(Struct):
    """At least one of body, attachment_ids and location."""

    body: Body | None = None
    attachment_ids: AttachmentIds = msgspec.field(default_factory=list)
    location: Location | None = None


class AgentMessageCreate(Struct):
    body: Body | None = None
    attachment_ids: AttachmentIds = msgspec.field(default_factory=list)
    internal: bool = False


class ReadMarker(Struct):
    up_to_message_id: UUID


class Author(Struct):
    type: Literal["user", "agent", "system"]
    id: UUID | None
    name: str | None


class MessageOut(Struct):
    id: UUID
    conversation_id: UUID
    author: Author
    body: str | None
    attachments: list[AttachmentOut]
    location: Location | None
    created_at: dt.datetime


class AgentMessageOut(MessageOut):
    internal: bool = False


class ConversationOut(Struct):
    """A conversation as its end user sees it."""

    id: UUID
    status: Status
    subject: str | None
    category: str | None
    tags: list[str]
    custom_fields: dict[str, Any]
    location: Location | None
    created_at: dt.datetime
    updated_at: dt.datetime
    last_message: MessageOut | None
    unread_count: int


class UnreadOut(Struct):
    unread_count: int


class AgentConversation(Struct):
    """A conversation in an agent's inbox."""

    id: UUID
    app_id: UUID
    status: Status
    priority: Priority
    subject: str | None
    category: str | None
    tags: list[str]
    assignee_id: UUID | None
    end_user: EndUserOut
    last_message: AgentMessageOut | None
    message_count: int
    unread_count: int
    created_at: dt.datetime
    updated_at: dt.datetime
    last_activity_at: dt.datetime


class AgentConversationDetail(AgentConversation):
    custom_fields: dict[str, Any] = msgspec.field(default_factory=dict)
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    location: Location | None = None
    messages: list[AgentMessageOut] = msgspec.field(default_factory=list)
    messages_next_cursor: str | None = None


class ConversationUpdate(Struct, forbid_unknown_fields=True):
    status: Status | UnsetType = UNSET
    assignee_id: UUID | UnsetType | None = UNSET
    tags: Tags | UnsetType = UNSET
    priority: Priority | UnsetType = UNSET
