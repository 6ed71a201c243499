"""Client and agent endpoints for conversations and messages."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from litestar import Controller, Request, Response, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.domain.attachments.services import AttachmentService
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
from tellback_server.domain.conversations.services import ConversationService, create_feedback
from tellback_server.http import examples
from tellback_server.http.deps import (
    AGENT,
    AGENT_AUTH,
    CLIENT,
    CLIENT_AUTH,
    AgentPrincipal,
    ClientPrincipal,
    app_state,
)
from tellback_server.http.idempotency import IdempotencyKeyHeader, idempotent
from tellback_server.http.openapi import example_body
from tellback_server.http.pagination import DEFAULT_LIMIT, Limit, Page


def provide_conversations(
    request: Request[Any, Any, Any], db: NamedDependency[AsyncSession]
) -> ConversationService:
    return ConversationService(db, AttachmentService(db, app_state(request).store))


_SERVICE = {"conversations": Provide(provide_conversations, sync_to_thread=False)}


class ClientConversationsController(Controller):
    path = "/v1/client"
    tags = ["client"]
    security = [{"sessionToken": []}]
    dependencies = {**CLIENT, **_SERVICE}
    middleware = CLIENT_AUTH

    @post(
        "/conversations", status_code=201, response_model=ConversationOut, summary="Send feedback"
    )
    async def create_conversation(
        self,
        request: Request[Any, Any, Any],
        client: NamedDependency[ClientPrincipal],
        data: Annotated[
            ConversationCreate,
            example_body(
                "Feedback with context, a location and a photo", examples.CONVERSATION_CREATE
            ),
        ],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[bytes]:
        """Creates the conversation with its first message. Send an `Idempotency-Key`:
        a retry with the same key and body replays the first response."""
        state = app_state(request)
        # The hot path: its own transaction of sync statements (db/engine.py, Tx), which
        # commits here, before the response goes out.
        async with state.db.transaction(write=True, lazy=True) as tx:
            return await idempotent(
                idempotency_key,
                request,
                tx,
                client.scope,
                201,
                lambda answer: create_feedback(tx, state.store, client, data, answer),
            )

    @get("/conversations", summary="My conversations, newest activity first")
    async def list_conversations(
        self,
        client: NamedDependency[ClientPrincipal],
        conversations: NamedDependency[ConversationService],
        cursor: FromQuery[str | None] = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> Page[ConversationOut]:
        return await conversations.client_list(client, cursor, limit)

    @get("/conversations/{conversation_id:uuid}", summary="One of my conversations")
    async def get_conversation(
        self,
        client: NamedDependency[ClientPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
    ) -> ConversationOut:
        return await conversations.client_get(client, conversation_id)

    @get("/conversations/{conversation_id:uuid}/messages", summary="Messages, oldest first")
    async def list_messages(
        self,
        client: NamedDependency[ClientPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
        cursor: FromQuery[str | None] = None,
        limit: Limit = DEFAULT_LIMIT,
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
        db: NamedDependency[AsyncSession],
        client: NamedDependency[ClientPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
        data: Annotated[MessageCreate, example_body("A follow-up", examples.MESSAGE_CREATE)],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[bytes]:
        return await idempotent(
            idempotency_key,
            request,
            db,
            client.scope,
            201,
            lambda _: conversations.client_add_message(client, conversation_id, data),
        )

    @post("/conversations/{conversation_id:uuid}/read", status_code=204, summary="Mark read")
    async def mark_read(
        self,
        client: NamedDependency[ClientPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
        data: Annotated[
            ReadMarker, example_body("Read up to the newest message", examples.READ_MARKER)
        ],
    ) -> None:
        """Marks every message up to and including `up_to_message_id` as read.
        Markers only move forward."""
        await conversations.client_read(client, conversation_id, data.up_to_message_id)

    @get("/unread", summary="Unread agent messages over all my conversations")
    async def unread(
        self,
        client: NamedDependency[ClientPrincipal],
        conversations: NamedDependency[ConversationService],
    ) -> UnreadOut:
        return await conversations.client_unread(client)


class AgentConversationsController(Controller):
    path = "/v1/agent/conversations"
    tags = ["agent"]
    security = [{"agentToken": []}]
    dependencies = {**AGENT, **_SERVICE}
    middleware = AGENT_AUTH

    @get("/", summary="Inbox: conversations of my apps, newest activity first")
    async def list_conversations(
        self,
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        app_id: FromQuery[UUID | None] = None,
        status: FromQuery[Literal["open", "pending", "solved", "closed"] | None] = None,
        assignee_id: FromQuery[UUID | None] = None,
        q: str | None = Parameter(
            default=None, max_length=200, description="searches subject and bodies"
        ),
        tag: str | None = Parameter(
            default=None, max_length=100, description="only conversations with this tag"
        ),
        cursor: FromQuery[str | None] = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> Page[AgentConversation]:
        return await conversations.agent_list(
            agent,
            app_id=app_id,
            status=status,
            q=q,
            tag=tag,
            assignee_id=assignee_id,
            cursor=cursor,
            limit=limit,
        )

    @get("/{conversation_id:uuid}", summary="A conversation with messages, context and end user")
    async def get_conversation(
        self,
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
    ) -> AgentConversationDetail:
        """Includes internal notes and up to 100 messages; page further with `/messages`."""
        return await conversations.agent_get(agent, conversation_id)

    @get("/{conversation_id:uuid}/messages", summary="Messages including internal notes")
    async def list_messages(
        self,
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
        cursor: FromQuery[str | None] = None,
        limit: Limit = DEFAULT_LIMIT,
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
        db: NamedDependency[AsyncSession],
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
        data: Annotated[AgentMessageCreate, example_body("A public answer", examples.AGENT_REPLY)],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[bytes]:
        return await idempotent(
            idempotency_key,
            request,
            db,
            agent.scope,
            201,
            lambda _: conversations.agent_reply(agent, conversation_id, data),
        )

    @patch("/{conversation_id:uuid}", summary="Change status, assignee, tags or priority")
    async def update_conversation(
        self,
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
        data: Annotated[
            ConversationUpdate, example_body("Solve and tag", examples.CONVERSATION_UPDATE)
        ],
    ) -> AgentConversation:
        return await conversations.agent_update(agent, conversation_id, data)

    @post("/{conversation_id:uuid}/read", status_code=204, summary="Mark read for agents")
    async def mark_read(
        self,
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
    ) -> None:
        await conversations.agent_read(agent, conversation_id)
