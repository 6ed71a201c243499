"""Client and agent endpoints for conversations and messages."""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from litestar import Controller, Request, Response, get, patch, post
from litestar.di import Provide
from litestar.params import Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.domain.conversations.schemas import (
    AgentConversation,
    AgentConversationDetail,
    AgentMessageCreate,
    AgentMessageOut,
    ConversationCreate,
    ConversationOut,
    ConversationUpdate,
    MessageCreate,
    MessageOut,
    ReadMarker,
    UnreadOut,
)
from tellback_server.domain.conversations.services import ConversationService
from tellback_server.http.deps import AGENT, CLIENT, AgentPrincipal, ClientPrincipal
from tellback_server.http.idempotency import idempotent
from tellback_server.http.pagination import DEFAULT_LIMIT, Page

Limit = Parameter(default=DEFAULT_LIMIT, ge=1, le=100, description="page size, 1-100")


def provide_conversations(db: AsyncSession) -> ConversationService:
    return ConversationService(db)


_SERVICE = {"conversations": Provide(provide_conversations, sync_to_thread=False)}


class ClientConversationsController(Controller):
    path = "/v1/client"
    tags = ["client"]
    dependencies = {**CLIENT, **_SERVICE}

    @post(
        "/conversations", status_code=201, response_model=ConversationOut, summary="Send feedback"
    )
    async def create_conversation(
        self,
        request: Request[Any, Any, Any],
        db: AsyncSession,
        client: ClientPrincipal,
        conversations: ConversationService,
        data: ConversationCreate,
    ) -> Response[bytes]:
        """Creates the conversation with its first message. Send an `Idempotency-Key`:
        a retry with the same key and body replays the first response."""
        return await idempotent(
            request, db, client.scope, 201, lambda: conversations.client_create(client, data)
        )

    @get("/conversations", summary="My conversations, newest activity first")
    async def list_conversations(
        self,
        client: ClientPrincipal,
        conversations: ConversationService,
        cursor: str | None = None,
        limit: int = Limit,
    ) -> Page[ConversationOut]:
        return await conversations.client_list(client, cursor, limit)

    @get("/conversations/{conversation_id:uuid}", summary="One of my conversations")
    async def get_conversation(
        self, client: ClientPrincipal, conversations: ConversationService, conversation_id: UUID
    ) -> ConversationOut:
        return await conversations.client_get(client, conversation_id)

    @get("/conversations/{conversation_id:uuid}/messages", summary="Messages, oldest first")
    async def list_messages(
        self,
        client: ClientPrincipal,
        conversations: ConversationService,
        conversation_id: UUID,
        cursor: str | None = None,
        limit: int = Limit,
    ) -> Page[MessageOut]:
        return await conversations.client_messages(client, conversation_id, cursor, limit)

    @post(
        "/conversations/{conversation_id:uuid}/messages",
        status_code=201,
        response_model=MessageOut,
        summary="Add a message",
    )
    async def create_message(
        self,
        request: Request[Any, Any, Any],
        db: AsyncSession,
        client: ClientPrincipal,
        conversations: ConversationService,
        conversation_id: UUID,
        data: MessageCreate,
    ) -> Response[bytes]:
        return await idempotent(
            request,
            db,
            client.scope,
            201,
            lambda: conversations.client_add_message(client, conversation_id, data),
        )

    @post("/conversations/{conversation_id:uuid}/read", status_code=204, summary="Mark read")
    async def mark_read(
        self,
        client: ClientPrincipal,
        conversations: ConversationService,
        conversation_id: UUID,
        data: ReadMarker,
    ) -> None:
        """Marks every message up to and including `up_to_message_id` as read.
        Markers only move forward."""
        await conversations.client_read(client, conversation_id, data.up_to_message_id)

    @get("/unread", summary="Unread agent messages over all my conversations")
    async def unread(
        self, client: ClientPrincipal, conversations: ConversationService
    ) -> UnreadOut:
        return await conversations.client_unread(client)


class AgentConversationsController(Controller):
    path = "/v1/agent/conversations"
    tags = ["agent"]
    dependencies = {**AGENT, **_SERVICE}

    @get("/", summary="Inbox: conversations of my apps, newest activity first")
    async def list_conversations(
        self,
        agent: AgentPrincipal,
        conversations: ConversationService,
        app_id: UUID | None = None,
        status: Literal["open", "pending", "solved", "closed"] | None = None,
        assignee_id: UUID | None = None,
        q: str | None = Parameter(
            default=None, max_length=200, description="searches subject and bodies"
        ),
        cursor: str | None = None,
        limit: int = Limit,
    ) -> Page[AgentConversation]:
        return await conversations.agent_list(
            agent,
            app_id=app_id,
            status=status,
            q=q,
            assignee_id=assignee_id,
            cursor=cursor,
            limit=limit,
        )

    @get("/{conversation_id:uuid}", summary="A conversation with messages, context and end user")
    async def get_conversation(
        self, agent: AgentPrincipal, conversations: ConversationService, conversation_id: UUID
    ) -> AgentConversationDetail:
        """Includes internal notes and up to 100 messages; page further with `/messages`."""
        return await conversations.agent_get(agent, conversation_id)

    @get("/{conversation_id:uuid}/messages", summary="Messages including internal notes")
    async def list_messages(
        self,
        agent: AgentPrincipal,
        conversations: ConversationService,
        conversation_id: UUID,
        cursor: str | None = None,
        limit: int = Limit,
    ) -> Page[AgentMessageOut]:
        return await conversations.agent_messages(agent, conversation_id, cursor, limit)

    @post(
        "/{conversation_id:uuid}/messages",
        status_code=201,
        response_model=AgentMessageOut,
        summary="Reply (or add an internal note)",
    )
    async def reply(
        self,
        request: Request[Any, Any, Any],
        db: AsyncSession,
        agent: AgentPrincipal,
        conversations: ConversationService,
        conversation_id: UUID,
        data: AgentMessageCreate,
    ) -> Response[bytes]:
        return await idempotent(
            request,
            db,
            agent.scope,
            201,
            lambda: conversations.agent_reply(agent, conversation_id, data),
        )

    @patch("/{conversation_id:uuid}", summary="Change status, assignee, tags or priority")
    async def update_conversation(
        self,
        agent: AgentPrincipal,
        conversations: ConversationService,
        conversation_id: UUID,
        data: ConversationUpdate,
    ) -> AgentConversation:
        return await conversations.agent_update(agent, conversation_id, data)

    @post("/{conversation_id:uuid}/read", status_code=204, summary="Mark read for agents")
    async def mark_read(
        self, agent: AgentPrincipal, conversations: ConversationService, conversation_id: UUID
    ) -> None:
        await conversations.agent_read(agent, conversation_id)
