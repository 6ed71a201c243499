"""Live events (``client.events.stream()``): typed structs and the parser.

Each event has the envelope ``id``, ``type``, ``timestamp`` and a typed ``data``;
``match`` on the class, or read the shortcuts (``event.message``,
``event.conversation``)::

    for event in client.events.stream():
        match event:
            case MessageCreated() if event.message.author.type == "agent":
                notify(event.message.body)
            case UnreadChanged():
                set_badge(event.data.unread_count)
            case Reset():
                reload_everything()

A type this SDK does not know (added by a later server) arrives as
``UnknownEvent`` with its raw ``data``, so old apps keep working. ``Reset`` has
no id: events were missed (beyond the server's replay window, an id it no
longer knows, or a reconnect without a resume point); reload what you show.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import msgspec
from msgspec import Struct

from tellback_sdk.types import Conversation, Message

__all__ = [
    "AttachmentData",
    "AttachmentUpdated",
    "ConversationCreated",
    "ConversationData",
    "ConversationMessageData",
    "ConversationUpdated",
    "LiveEvent",
    "MessageCreated",
    "Reset",
    "ResetData",
    "UnknownEvent",
    "UnreadChanged",
    "UnreadData",
    "parse_event",
]

log = logging.getLogger("tellback_sdk.events")


class ConversationMessageData(Struct, kw_only=True, frozen=True):
    conversation: Conversation
    message: Message


class ConversationData(Struct, kw_only=True, frozen=True):
    conversation: Conversation


class UnreadData(Struct, kw_only=True, frozen=True):
    unread_count: int  # the user's total: the app badge
    conversation_id: str
    conversation_unread_count: int


class AttachmentData(Struct, kw_only=True, frozen=True):
    attachment_id: str
    message_id: str
    conversation_id: str
    status: str  # ready | rejected
    reason: str | None = None  # why it was rejected


class ResetData(Struct, kw_only=True, frozen=True):
    reason: str | None = None


class LiveEvent(Struct, kw_only=True, frozen=True):
    """Base of every event: ``id`` (decimal string; None only on ``Reset``), ``type``,
    ``timestamp`` (None on ``Reset``)."""

    id: str | None = None
    type: str
    timestamp: dt.datetime | None = None


class ConversationCreated(LiveEvent, kw_only=True, frozen=True):
    """The user's own new conversation (e.g. sent from another device)."""

    data: ConversationMessageData

    @property
    def conversation(self) -> Conversation:
        return self.data.conversation

    @property
    def message(self) -> Message:
        return self.data.message


class MessageCreated(LiveEvent, kw_only=True, frozen=True):
    """A new message in one of the user's conversations (an agent's reply, or the
    user's own from another device); ``conversation`` is its state after it."""

    data: ConversationMessageData

    @property
    def conversation(self) -> Conversation:
        return self.data.conversation

    @property
    def message(self) -> Message:
        return self.data.message


class ConversationUpdated(LiveEvent, kw_only=True, frozen=True):
    """Status (or other visible state) of a conversation changed."""

    data: ConversationData

    @property
    def conversation(self) -> Conversation:
        return self.data.conversation


class UnreadChanged(LiveEvent, kw_only=True, frozen=True):
    data: UnreadData

    @property
    def unread_count(self) -> int:
        return self.data.unread_count


class AttachmentUpdated(LiveEvent, kw_only=True, frozen=True):
    """A photo or video on one of the user's messages finished processing: ``ready``, or
    ``rejected`` with a ``reason``. It carries no URL (URLs expire; events are replayed
    for days): fetch the attachment (``attachments.get``) or the messages again."""

    data: AttachmentData

    @property
    def attachment_id(self) -> str:
        return self.data.attachment_id

    @property
    def status(self) -> str:
        return self.data.status


class Reset(LiveEvent, kw_only=True, frozen=True):
    """Events were missed: refetch conversations and the unread count, then carry on."""

    type: str = "reset"
    data: ResetData = msgspec.field(default_factory=ResetData)

    @property
    def reason(self) -> str | None:
        return self.data.reason


class UnknownEvent(LiveEvent, kw_only=True, frozen=True):
    """A type this SDK does not know; ``data`` is the raw JSON object."""

    data: Any = None


KNOWN: dict[str, type[LiveEvent]] = {
    "conversation.created": ConversationCreated,
    "message.created": MessageCreated,
    "conversation.updated": ConversationUpdated,
    "unread.changed": UnreadChanged,
    "attachment.updated": AttachmentUpdated,
    "reset": Reset,
}


def parse_event(data: str | bytes, *, event: str | None = None, id: str | None = None) -> LiveEvent:
    """One SSE event's ``data:`` JSON as a typed event.

    ``event`` and ``id`` are the SSE fields (they win over the JSON's when the JSON lacks
    them). An unknown type, or a known type whose data this SDK cannot read (a server
    change), becomes ``UnknownEvent``: a live stream must not die on one event.
    Raises ``ValueError`` only if ``data`` is not a JSON object.
    """
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"event data is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("event data is not a JSON object")  # noqa: TRY004 (bad input)
    type_ = raw.get("type") if isinstance(raw.get("type"), str) else None
    type_ = type_ or event or "message"
    if raw.get("id") is None and id is not None:
        raw["id"] = id
    raw["type"] = type_
    cls = KNOWN.get(type_, UnknownEvent)
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        log.warning("tellback: cannot read a %s event (%s); passing it on raw", type_, exc)
        ts = raw.get("timestamp")
        try:
            when = dt.datetime.fromisoformat(ts) if isinstance(ts, str) else None
        except ValueError:
            when = None
        ident = raw.get("id")
        ident = None if ident is None else str(ident)
        return UnknownEvent(id=ident, type=type_, timestamp=when, data=raw.get("data"))
