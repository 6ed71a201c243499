"""Conversations and messages, for end users and for agents.

Scoping lives here and only here: every client query is filtered by app and
end user, every agent query by the agent's apps. An id outside that scope is
simply not found (404), so nothing leaks whether it exists.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any
from uuid import UUID

import msgspec
from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.db.models import (
    Agent,
    AgentApp,
    Attachment,
    Conversation,
    EndUser,
    Message,
)
from tellback_server.domain.apps.services import parse_settings
from tellback_server.domain.attachments.schemas import AttachmentOut
from tellback_server.domain.attachments.services import AttachmentService
from tellback_server.domain.conversations.rules import (
    clean_body,
    clean_tags,
    validate_category,
    validate_context,
    validate_custom_fields,
)
from tellback_server.domain.conversations.schemas import (
    AgentConversation,
    AgentConversationDetail,
    AgentMessageCreate,
    AgentMessageOut,
    Author,
    ConversationCreate,
    ConversationOut,
    ConversationUpdate,
    Location,
    MessageCreate,
    MessageOut,
    UnreadOut,
)
from tellback_server.domain.identity.services import user_out
from tellback_server.domain.push.delivery import queue_fanout
from tellback_server.http.deps import AgentPrincipal, ClientPrincipal
from tellback_server.http.errors import AppError, NotFound, ValidationFailed
from tellback_server.http.pagination import Page, check_limit, keyset_page

DETAIL_MESSAGES = 100


class ConversationClosed(AppError):
    status_code, code = 409, "conversation_closed"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _location(raw: dict[str, Any] | None) -> Location | None:
    return msgspec.convert(raw, Location) if raw else None


def _like(q: str) -> str:
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class _Related:
    """Batch lookup of what messages point at: author names and attachments."""

    def __init__(self, db: AsyncSession, attachments: AttachmentService) -> None:
        self.db = db
        self.attachment_service = attachments
        self.users: dict[UUID, str | None] = {}
        self.agents: dict[UUID, str | None] = {}
        self.attachments: dict[UUID, list[AttachmentOut]] = {}

    async def load(self, messages: Iterable[Message]) -> None:
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

    def author(self, m: Message) -> Author:
        if m.author_type == "agent" and m.author_agent_id is not None:
            return Author(
                type="agent", id=m.author_agent_id, name=self.agents.get(m.author_agent_id)
            )
        if m.author_type == "user" and m.author_user_id is not None:
            return Author(type="user", id=m.author_user_id, name=self.users.get(m.author_user_id))
        return Author(type="system", id=None, name=None)


def _message_out(m: Message, authors: _Related) -> MessageOut:
    return MessageOut(
        id=m.id,
        conversation_id=m.conversation_id,
        author=authors.author(m),
        body=m.body,
        attachments=authors.attachments.get(m.id, []),
        location=_location(m.location),
        created_at=m.created_at,
    )


def _agent_message_out(m: Message, authors: _Related) -> AgentMessageOut:
    base = _message_out(m, authors)
    return AgentMessageOut(**msgspec.structs.asdict(base), internal=m.internal)


class ConversationService:
    def __init__(self, db: AsyncSession, attachments: AttachmentService) -> None:
        self.db = db
        self.attachments = attachments

    # ----- shared -------------------------------------------------------------------------

    async def _add_message(
        self,
        conv: Conversation,
        *,
        author_type: str,
        body: str | None,
        user_id: UUID | None = None,
        agent_id: UUID | None = None,
        attachments: Sequence[Attachment] = (),
        location: Location | None = None,
        internal: bool = False,
        now: dt.datetime,
    ) -> Message:
        message = Message(
            conversation_id=conv.id,
            app_id=conv.app_id,
            author_type=author_type,
            author_user_id=user_id,
            author_agent_id=agent_id,
            body=body,
            internal=internal,
            attachment_ids=[str(a.id) for a in attachments],
            location=msgspec.to_builtins(location) if location is not None else None,
            created_at=now,
            updated_at=now,
        )
        self.db.add(message)
        await self.db.flush()
        for att in attachments:
            att.message_id = message.id
        conv.message_count += 1
        conv.last_message_id = message.id
        conv.last_activity_at = now
        conv.updated_at = now
        if not internal:
            conv.last_public_message_id = message.id
            conv.public_activity_at = now
        return message

    async def _messages_page(
        self, conv_id: UUID, cursor: str | None, limit: int, *, include_internal: bool
    ) -> tuple[list[Message], str | None]:
        stmt = select(Message).where(Message.conversation_id == conv_id)
        if not include_internal:
            stmt = stmt.where(Message.internal.is_(False))
        return await keyset_page(self.db, stmt, Message.created_at, Message.id, cursor, limit)

    async def _messages_by_id(self, ids: Iterable[UUID | None]) -> dict[UUID, Message]:
        wanted = {i for i in ids if i is not None}
        if not wanted:
            return {}
        return {
            m.id: m for m in await self.db.scalars(select(Message).where(Message.id.in_(wanted)))
        }

    # ----- end users ----------------------------------------------------------------------

    async def _client_conv(
        self, client: ClientPrincipal, conv_id: UUID, *, lock: bool = False
    ) -> Conversation:
        stmt = select(Conversation).where(
            Conversation.id == conv_id,
            Conversation.app_id == client.app_id,
            Conversation.end_user_id == client.end_user_id,
        )
        if lock and self.db.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        conv = await self.db.scalar(stmt)
        if conv is None:
            raise NotFound("no such conversation")
        return conv

    async def _client_outs(self, convs: Sequence[Conversation]) -> list[ConversationOut]:
        last = await self._messages_by_id(c.last_public_message_id for c in convs)
        authors = _Related(self.db, self.attachments)
        await authors.load(last.values())
        return [
            ConversationOut(
                id=c.id,
                status=c.status,  # type: ignore[arg-type]
                subject=c.subject,
                category=c.category,
                tags=list(c.tags or []),
                custom_fields=dict(c.custom_fields or {}),
                location=_location(c.location),
                created_at=c.created_at,
                updated_at=c.public_activity_at,
                last_message=(
                    _message_out(last[c.last_public_message_id], authors)
                    if c.last_public_message_id in last
                    else None
                ),
                unread_count=c.user_unread_count,
            )
            for c in convs
        ]

    async def client_create(
        self, client: ClientPrincipal, data: ConversationCreate
    ) -> ConversationOut:
        settings = parse_settings(client.app_settings)
        validate_category(settings, data.category)
        custom_fields = validate_custom_fields(settings, data.custom_fields)
        context = validate_context(data.context)
        body = clean_body(data.body, required=True)
        attachments = await self.attachments.claim(
            client.app_id, client.end_user_id, data.attachment_ids
        )
        now = _now()
        conv = Conversation(
            app_id=client.app_id,
            end_user_id=client.end_user_id,
            status="open",
            priority="normal",
            subject=data.subject.strip() if data.subject and data.subject.strip() else None,
            category=data.category,
            tags=clean_tags(data.tags),
            custom_fields=custom_fields,
            context=context,
            location=msgspec.to_builtins(data.location) if data.location is not None else None,
            last_activity_at=now,
            public_activity_at=now,
            message_count=0,
            user_unread_count=0,
            agent_unread_count=1,
            created_at=now,
            updated_at=now,
        )
        self.db.add(conv)
        await self.db.flush()
        message = await self._add_message(
            conv,
            author_type="user",
            user_id=client.end_user_id,
            body=body,
            attachments=attachments,
            location=data.location,
            now=now,
        )
        await queue_fanout(self.db, message.id, "agents")
        return (await self._client_outs([conv]))[0]

    async def client_list(
        self, client: ClientPrincipal, cursor: str | None, limit: int
    ) -> Page[ConversationOut]:
        stmt = select(Conversation).where(
            Conversation.app_id == client.app_id, Conversation.end_user_id == client.end_user_id
        )
        rows, nxt = await keyset_page(
            self.db,
            stmt,
            Conversation.public_activity_at,
            Conversation.id,
            cursor,
            limit,
            descending=True,
        )
        return Page(items=await self._client_outs(rows), next_cursor=nxt)

    async def client_get(self, client: ClientPrincipal, conv_id: UUID) -> ConversationOut:
        return (await self._client_outs([await self._client_conv(client, conv_id)]))[0]

    async def client_messages(
        self, client: ClientPrincipal, conv_id: UUID, cursor: str | None, limit: int
    ) -> Page[MessageOut]:
        conv = await self._client_conv(client, conv_id)
        rows, nxt = await self._messages_page(conv.id, cursor, limit, include_internal=False)
        authors = _Related(self.db, self.attachments)
        await authors.load(rows)
        return Page(items=[_message_out(m, authors) for m in rows], next_cursor=nxt)

    async def client_add_message(
        self, client: ClientPrincipal, conv_id: UUID, data: MessageCreate
    ) -> MessageOut:
        if data.body is None and not data.attachment_ids and data.location is None:
            raise ValidationFailed.field(
                "body", "a message needs a body, attachments or a location"
            )
        body = clean_body(data.body, required=False)
        conv = await self._client_conv(client, conv_id, lock=True)
        if conv.status == "closed":
            raise ConversationClosed("this conversation is closed; start a new one")
        attachments = await self.attachments.claim(
            client.app_id, client.end_user_id, data.attachment_ids
        )
        now = _now()
        message = await self._add_message(
            conv,
            author_type="user",
            user_id=client.end_user_id,
            body=body,
            attachments=attachments,
            location=data.location,
            now=now,
        )
        if conv.status in {"pending", "solved"}:
            conv.status = "open"
        conv.agent_unread_count += 1
        await queue_fanout(self.db, message.id, "agents")
        authors = _Related(self.db, self.attachments)
        await authors.load([message])
        return _message_out(message, authors)

    async def client_read(self, client: ClientPrincipal, conv_id: UUID, message_id: UUID) -> None:
        conv = await self._client_conv(client, conv_id, lock=True)
        message = await self.db.scalar(
            select(Message).where(
                Message.id == message_id,
                Message.conversation_id == conv.id,
                Message.internal.is_(False),
            )
        )
        if message is None:
            raise NotFound("no such message in this conversation")
        if conv.user_read_at is not None and conv.user_read_at >= message.created_at:
            return  # markers only move forward
        conv.user_read_at = message.created_at
        conv.user_unread_count = int(
            await self.db.scalar(
                select(func.count())
                .select_from(Message)
                .where(
                    Message.conversation_id == conv.id,
                    Message.author_type == "agent",
                    Message.internal.is_(False),
                    Message.created_at > message.created_at,
                )
            )
            or 0
        )

    async def client_unread(self, client: ClientPrincipal) -> UnreadOut:
        total = await self.db.scalar(
            select(func.coalesce(func.sum(Conversation.user_unread_count), 0)).where(
                Conversation.app_id == client.app_id, Conversation.end_user_id == client.end_user_id
            )
        )
        return UnreadOut(unread_count=int(total or 0))

    # ----- agents -------------------------------------------------------------------------

    async def _agent_conv(
        self, agent: AgentPrincipal, conv_id: UUID, *, lock: bool = False
    ) -> Conversation:
        if not agent.app_ids:
            raise NotFound("no such conversation")
        stmt = select(Conversation).where(
            Conversation.id == conv_id, Conversation.app_id.in_(agent.app_ids)
        )
        if lock and self.db.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        conv = await self.db.scalar(stmt)
        if conv is None:
            raise NotFound("no such conversation")
        return conv

    async def _agent_outs(self, convs: Sequence[Conversation]) -> list[AgentConversation]:
        last = await self._messages_by_id(c.last_message_id for c in convs)
        authors = _Related(self.db, self.attachments)
        await authors.load(last.values())
        users = (
            {
                u.id: u
                for u in await self.db.scalars(
                    select(EndUser).where(EndUser.id.in_({c.end_user_id for c in convs}))
                )
            }
            if convs
            else {}
        )
        return [
            AgentConversation(
                id=c.id,
                app_id=c.app_id,
                status=c.status,  # type: ignore[arg-type]
                priority=c.priority,  # type: ignore[arg-type]
                subject=c.subject,
                category=c.category,
                tags=list(c.tags or []),
                assignee_id=c.assignee_id,
                end_user=user_out(users[c.end_user_id]),
                last_message=(
                    _agent_message_out(last[c.last_message_id], authors)
                    if c.last_message_id in last
                    else None
                ),
                message_count=c.message_count,
                unread_count=c.agent_unread_count,
                created_at=c.created_at,
                updated_at=c.updated_at,
                last_activity_at=c.last_activity_at,
            )
            for c in convs
        ]

    async def agent_list(
        self,
        agent: AgentPrincipal,
        *,
        app_id: UUID | None,
        status: str | None,
        q: str | None,
        assignee_id: UUID | None,
        cursor: str | None,
        limit: int,
    ) -> Page[AgentConversation]:
        check_limit(limit)
        apps = agent.app_ids if app_id is None else agent.app_ids & {app_id}
        if not apps:
            return Page(items=[], next_cursor=None)
        stmt = select(Conversation).where(Conversation.app_id.in_(apps))
        if status is not None:
            stmt = stmt.where(Conversation.status == status)
        if assignee_id is not None:
            stmt = stmt.where(Conversation.assignee_id == assignee_id)
        if q:
            pattern = _like(q.strip())
            body_match = exists().where(
                Message.conversation_id == Conversation.id,
                Message.body.ilike(pattern, escape="\\"),
            )
            stmt = stmt.where(or_(Conversation.subject.ilike(pattern, escape="\\"), body_match))
        rows, nxt = await keyset_page(
            self.db,
            stmt,
            Conversation.last_activity_at,
            Conversation.id,
            cursor,
            limit,
            descending=True,
        )
        return Page(items=await self._agent_outs(rows), next_cursor=nxt)

    async def agent_get(self, agent: AgentPrincipal, conv_id: UUID) -> AgentConversationDetail:
        conv = await self._agent_conv(agent, conv_id)
        summary = (await self._agent_outs([conv]))[0]
        rows, nxt = await self._messages_page(conv.id, None, DETAIL_MESSAGES, include_internal=True)
        authors = _Related(self.db, self.attachments)
        await authors.load(rows)
        return AgentConversationDetail(
            **msgspec.structs.asdict(summary),
            custom_fields=dict(conv.custom_fields or {}),
            context=dict(conv.context or {}),
            location=_location(conv.location),
            messages=[_agent_message_out(m, authors) for m in rows],
            messages_next_cursor=nxt,
        )

    async def agent_messages(
        self, agent: AgentPrincipal, conv_id: UUID, cursor: str | None, limit: int
    ) -> Page[AgentMessageOut]:
        conv = await self._agent_conv(agent, conv_id)
        rows, nxt = await self._messages_page(conv.id, cursor, limit, include_internal=True)
        authors = _Related(self.db, self.attachments)
        await authors.load(rows)
        return Page(items=[_agent_message_out(m, authors) for m in rows], next_cursor=nxt)

    async def agent_reply(
        self, agent: AgentPrincipal, conv_id: UUID, data: AgentMessageCreate
    ) -> AgentMessageOut:
        if data.body is None and not data.attachment_ids:
            raise ValidationFailed.field("body", "a reply needs a body or attachments")
        body = clean_body(data.body, required=False)
        conv = await self._agent_conv(agent, conv_id, lock=True)
        attachments = await self.attachments.claim(conv.app_id, None, data.attachment_ids)
        now = _now()
        message = await self._add_message(
            conv,
            author_type="agent",
            agent_id=agent.agent_id,
            body=body,
            attachments=attachments,
            internal=data.internal,
            now=now,
        )
        if not data.internal:
            await queue_fanout(self.db, message.id, "user")
            conv.user_unread_count += 1
            conv.agent_unread_count = 0
            if conv.status == "open":
                conv.status = "pending"
        authors = _Related(self.db, self.attachments)
        authors.agents[agent.agent_id] = agent.name  # known from the token: no lookup
        await authors.load([message])
        return _agent_message_out(message, authors)

    async def agent_update(
        self, agent: AgentPrincipal, conv_id: UUID, data: ConversationUpdate
    ) -> AgentConversation:
        conv = await self._agent_conv(agent, conv_id, lock=True)
        if data.assignee_id is not msgspec.UNSET and data.assignee_id is not None:
            allowed = await self.db.scalar(
                select(AgentApp.id)
                .join(Agent, Agent.id == AgentApp.agent_id)
                .where(
                    AgentApp.agent_id == data.assignee_id,
                    AgentApp.app_id == conv.app_id,
                    Agent.disabled_at.is_(None),
                )
            )
            if allowed is None:
                raise ValidationFailed.field("assignee_id", "not an active agent of this app")
        if data.status is not msgspec.UNSET:
            conv.status = data.status
        if data.assignee_id is not msgspec.UNSET:
            conv.assignee_id = data.assignee_id
        if data.tags is not msgspec.UNSET:
            conv.tags = clean_tags(data.tags)
        if data.priority is not msgspec.UNSET:
            conv.priority = data.priority
        conv.updated_at = _now()
        await self.db.flush()
        return (await self._agent_outs([conv]))[0]

    async def agent_read(self, agent: AgentPrincipal, conv_id: UUID) -> None:
        conv = await self._agent_conv(agent, conv_id)
        await self.db.execute(
            update(Conversation).where(Conversation.id == conv.id).values(agent_unread_count=0)
        )
