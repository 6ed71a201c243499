"""Wire views of conversations and messages, built from ORM rows with batched lookups.

The views read only the attributes named in :class:`ConversationFields` and
:class:`MessageFields`: an ORM row, or (sending feedback, the hot path) the very
column values that were just inserted, without building ORM instances for them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any, Protocol
from uuid import UUID

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.db.models import Agent, EndUser
from tellback_server.domain.attachments.schemas import AttachmentOut
from tellback_server.domain.attachments.services import AttachmentService
from tellback_server.domain.conversations.schemas import (
    AgentConversation,
    AgentMessageOut,
    Author,
    ConversationOut,
    Location,
    MessageOut,
)
from tellback_server.domain.identity.services import UserFields, user_out


class MessageFields(Protocol):
    """What the message views read: a ``Message`` row, or just its columns."""

    @property
    def id(self) -> UUID: ...
    @property
    def conversation_id(self) -> UUID: ...
    @property
    def author_type(self) -> str: ...
    @property
    def author_user_id(self) -> UUID | None: ...
    @property
    def author_agent_id(self) -> UUID | None: ...
    @property
    def body(self) -> str | None: ...
    @property
    def internal(self) -> bool: ...
    @property
    def attachment_ids(self) -> list[str]: ...
    @property
    def location(self) -> dict[str, Any] | None: ...
    @property
    def created_at(self) -> dt.datetime: ...


class _ConversationBasics(Protocol):
    """What every view of a conversation reads."""

    @property
    def id(self) -> UUID: ...
    @property
    def status(self) -> str: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def category(self) -> str | None: ...
    @property
    def tags(self) -> list[str]: ...
    @property
    def created_at(self) -> dt.datetime: ...


class ClientConversationFields(_ConversationBasics, Protocol):
    """What the end user's view of a conversation reads."""

    @property
    def custom_fields(self) -> dict[str, Any]: ...
    @property
    def location(self) -> dict[str, Any] | None: ...
    @property
    def user_unread_count(self) -> int: ...
    @property
    def public_activity_at(self) -> dt.datetime: ...


class AgentConversationFields(_ConversationBasics, Protocol):
    """What the agents' view of a conversation reads."""

    @property
    def app_id(self) -> UUID: ...
    @property
    def priority(self) -> str: ...
    @property
    def assignee_id(self) -> UUID | None: ...
    @property
    def message_count(self) -> int: ...
    @property
    def agent_unread_count(self) -> int: ...
    @property
    def updated_at(self) -> dt.datetime: ...
    @property
    def last_activity_at(self) -> dt.datetime: ...


class ConversationFields(ClientConversationFields, AgentConversationFields, Protocol):
    """What the conversation views read: a ``Conversation`` row, or just its columns."""

    @property
    def end_user_id(self) -> UUID: ...


def location_of(raw: dict[str, Any] | None) -> Location | None:
    return msgspec.convert(raw, Location) if raw else None


class Related:
    """Batch lookup of what messages point at: author names and attachments."""

    def __init__(
        self, db: AsyncSession | None = None, attachments: AttachmentService | None = None
    ) -> None:
        self.db = db
        self.attachment_service = attachments
        self.users: dict[UUID, str | None] = {}
        self.agents: dict[UUID, str | None] = {}
        self.attachments: dict[UUID, list[AttachmentOut]] = {}

    async def load(self, messages: Iterable[MessageFields]) -> None:
        assert self.db is not None
        assert self.attachment_service is not None
        messages = list(messages)
        with_files = [m.id for m in messages if m.attachment_ids and m.id not in self.attachments]
        self.attachments.update(await self.attachment_service.for_messages(with_files))
        user_ids = {m.author_user_id for m in messages if m.author_user_id} - self.users.keys()
        agent_ids = {m.author_agent_id for m in messages if m.author_agent_id} - self.agents.keys()
        if user_ids:
            rows = await self.db.execute(
                select(EndUser.id, EndUser.name).where(EndUser.id.in_(user_ids))
            )
            self.users.update({r.id: r.name for r in rows})
        if agent_ids:
            rows = await self.db.execute(
                select(Agent.id, Agent.name).where(Agent.id.in_(agent_ids))
            )
            self.agents.update({r.id: r.name for r in rows})

    def author(self, m: MessageFields) -> Author:
        if m.author_type == "agent" and m.author_agent_id is not None:
            return Author(
                type="agent", id=m.author_agent_id, name=self.agents.get(m.author_agent_id)
            )
        if m.author_type == "user" and m.author_user_id is not None:
            return Author(type="user", id=m.author_user_id, name=self.users.get(m.author_user_id))
        return Author(type="system", id=None, name=None)


def message_out(m: MessageFields, authors: Related) -> MessageOut:
    return MessageOut(
        id=m.id,
        conversation_id=m.conversation_id,
        author=authors.author(m),
        body=m.body,
        attachments=authors.attachments.get(m.id, []),
        location=location_of(m.location),
        created_at=m.created_at,
    )


def agent_message_out(m: MessageFields, authors: Related) -> AgentMessageOut:
    base = message_out(m, authors)
    return AgentMessageOut(**msgspec.structs.asdict(base), internal=m.internal)


def client_conversation_out(
    c: ClientConversationFields, last: MessageFields | None, authors: Related
) -> ConversationOut:
    return ConversationOut(
        id=c.id,
        status=c.status,  # type: ignore[arg-type]
        subject=c.subject,
        category=c.category,
        tags=list(c.tags or []),
        custom_fields=dict(c.custom_fields or {}),
        location=location_of(c.location),
        created_at=c.created_at,
        updated_at=c.public_activity_at,
        last_message=message_out(last, authors) if last is not None else None,
        unread_count=c.user_unread_count,
    )


def agent_conversation_out(
    c: AgentConversationFields, last: MessageFields | None, authors: Related, user: UserFields
) -> AgentConversation:
    return AgentConversation(
        id=c.id,
        app_id=c.app_id,
        status=c.status,  # type: ignore[arg-type]
        priority=c.priority,  # type: ignore[arg-type]
        subject=c.subject,
        category=c.category,
        tags=list(c.tags or []),
        assignee_id=c.assignee_id,
        end_user=user_out(user),
        last_message=agent_message_out(last, authors) if last is not None else None,
        message_count=c.message_count,
        unread_count=c.agent_unread_count,
        created_at=c.created_at,
        updated_at=c.updated_at,
        last_activity_at=c.last_activity_at,
    )
