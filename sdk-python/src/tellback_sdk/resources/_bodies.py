"""Request bodies for conversations and messages, shared by every client flavour."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import msgspec

from tellback_sdk._core import RequestSpec
from tellback_sdk._outbox_store import AttachmentFile, OutboxStore, QueuedItem
from tellback_sdk.errors import OutboxError
from tellback_sdk.pagination import Page
from tellback_sdk.types import Location, PageBody

AttachmentSource = str | os.PathLike[str] | AttachmentFile


class ConversationFields(TypedDict, total=False):
    subject: str
    category: str
    tags: list[str]
    custom_fields: dict[str, Any]
    context: dict[str, Any]
    location: Location | dict[str, Any]
    attachments: Sequence[AttachmentSource]  # files: uploaded first (or queued with it)
    attachment_ids: Sequence[str]  # uploads already completed


class MessageFields(TypedDict, total=False):
    location: Location | dict[str, Any]
    attachments: Sequence[AttachmentSource]
    attachment_ids: Sequence[str]


def files_of(fields: ConversationFields | MessageFields) -> list[AttachmentFile]:
    return [
        f if isinstance(f, AttachmentFile) else AttachmentFile(Path(f))
        for f in fields.get("attachments", ())
    ]


def body_of(text: str | None, fields: ConversationFields | MessageFields) -> dict[str, Any]:
    """The JSON body without the ids of files still to upload."""
    body: dict[str, Any] = {}
    if text is not None:
        body["body"] = text
    for key, value in fields.items():
        if key == "attachments" or value is None:
            continue
        body[key] = value
    if isinstance(body.get("location"), Location):
        body["location"] = msgspec.to_builtins(body["location"])
    if "attachment_ids" in body:
        body["attachment_ids"] = [str(i) for i in fields.get("attachment_ids", ())]
    return body


def check_conversation(text: str) -> None:
    if not text or not text.strip():
        raise ValueError("feedback needs a body")


def check_message(text: str | None, fields: MessageFields) -> None:
    if not (text or fields.get("attachments") or fields.get("attachment_ids")) and not fields.get(
        "location"
    ):
        raise ValueError("a message needs a body, attachments or a location")


def conversation_ref(conversation: str | QueuedItem, outbox: OutboxStore) -> str:
    """A real id, or ``local:<item id>`` for a conversation still in the outbox (the
    caller's ``QueuedItem`` may be an old snapshot: the store knows if it was sent)."""
    if isinstance(conversation, str):
        return conversation
    if conversation.kind != "conversation":
        raise OutboxError("a message must be queued for a conversation, not a message")
    current = outbox.get(conversation.id) or conversation
    if current.conversation_id is not None:
        return current.conversation_id
    return f"local:{conversation.id}"


def messages_path(conversation_id: str) -> str:
    return f"/v1/client/conversations/{conversation_id}/messages"


def list_spec(path: str, cursor: str | None, limit: int | None) -> RequestSpec:
    params: dict[str, str | int] = {}
    if cursor is not None:
        params["cursor"] = cursor
    if limit is not None:
        params["limit"] = limit
    return RequestSpec("GET", path, params=params)


def to_page(body: PageBody[Any]) -> Page[Any]:
    return Page(items=list(body.items), next_cursor=body.next_cursor)


def read_spec(conversation_id: str, message_id: str) -> RequestSpec:
    return RequestSpec(
        "POST",
        f"/v1/client/conversations/{conversation_id}/read",
        content=msgspec.json.encode({"up_to_message_id": message_id}),
        safe_to_repeat=True,  # read markers only move forward
    )
