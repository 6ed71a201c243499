"""The console's reads and form decoding: conversations through
``ConversationService.agent_*``, and the names of the agent's own apps."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.db.models import App
from tellback_server.domain.agents.services import teammates
from tellback_server.domain.console.views import (
    PRIORITIES,
    STATUSES,
    AttachmentView,
    InboxFilters,
    attachment_view,
    context_sections,
    map_url,
    scalar,
    short_id,
)
from tellback_server.domain.conversations.schemas import (
    AgentConversation,
    AgentMessageOut,
    ConversationUpdate,
    Location,
)
from tellback_server.domain.conversations.services import ConversationService
from tellback_server.http.deps import AgentPrincipal

PAGE = 25
# The detail view carries the first 100 messages; the console follows the cursor this
# many pages further so the newest messages are on screen.
MORE_MESSAGE_PAGES = 9


async def inbox_page(
    conversations: ConversationService, agent: AgentPrincipal, f: InboxFilters
) -> tuple[list[AgentConversation], str | None]:
    page = await conversations.agent_list(
        agent,
        app_id=f.app_id,
        status=f.status,
        q=f.q,
        tag=f.tag,
        assignee_id=agent.agent_id if f.mine else None,
        cursor=f.cursor,
        limit=PAGE,
    )
    return list(page.items), page.next_cursor


async def app_labels(db: AsyncSession, agent: AgentPrincipal) -> dict[UUID, str]:
    """What the console calls each of the agent's apps: its name, with the id's first
    characters when another of them has the same name (names need not be unique)."""
    if not agent.app_ids:
        return {}
    rows = (await db.execute(select(App.id, App.name).where(App.id.in_(agent.app_ids)))).all()
    count: dict[str, int] = {}
    for row in rows:
        count[row.name] = count.get(row.name, 0) + 1
    return {
        row.id: row.name if count[row.name] == 1 else f"{row.name} ({short_id(row.id)})"
        for row in rows
    }


@dataclass(frozen=True, slots=True)
class MessageView:
    id: UUID
    author_type: str
    author_name: str
    internal: bool
    body: str | None
    created_at: dt.datetime
    attachments: list[AttachmentView]
    location: Location | None
    map_url: str | None


def message_view(m: AgentMessageOut, shown: Location | None = None) -> MessageView:
    """``shown``: the conversation's location, in the side panel already."""
    if m.author.type == "agent":
        name = m.author.name or "Agent"
    elif m.author.type == "user":
        name = m.author.name or "User"
    else:
        name = "System"
    return MessageView(
        id=m.id,
        author_type=m.author.type,
        author_name=name,
        internal=m.internal,
        body=m.body,
        created_at=m.created_at,
        attachments=[attachment_view(a) for a in m.attachments],
        location=None if m.location == shown else m.location,
        map_url=map_url(m.location) if m.location is not None and m.location != shown else None,
    )


async def conversation_context(
    conversations: ConversationService, agent: AgentPrincipal, conversation_id: UUID
) -> dict[str, Any]:
    detail = await conversations.agent_get(agent, conversation_id)
    team = await teammates(conversations.db, agent, detail.app_id)
    apps = await app_labels(conversations.db, agent)
    names = {t.id: t.name for t in team}
    messages = list(detail.messages)
    cursor = detail.messages_next_cursor
    for _ in range(MORE_MESSAGE_PAGES):
        if cursor is None:
            break
        page = await conversations.agent_messages(agent, conversation_id, cursor, 100)
        messages += page.items
        cursor = page.next_cursor
    return {
        "c": detail,
        "app_name": apps.get(detail.app_id) or short_id(detail.app_id),
        "messages": [message_view(m, detail.location) for m in messages],
        "truncated": cursor is not None,
        "context_sections": context_sections(detail.context),
        "custom_fields": [(k, scalar(v)) for k, v in sorted(detail.custom_fields.items())],
        "location": detail.location,
        "location_map_url": map_url(detail.location) if detail.location else None,
        "statuses": STATUSES,
        "priorities": PRIORITIES,
        "assigned_to_me": detail.assignee_id == agent.agent_id,
        "assignee_name": names.get(detail.assignee_id) if detail.assignee_id else None,
        "teammates": [t for t in team if t.id not in {agent.agent_id, detail.assignee_id}],
    }


def update_from_form(form: dict[str, str], agent: AgentPrincipal) -> ConversationUpdate:
    """The controls form as a PATCH body, validated like the API's JSON (msgspec).

    Only what the agent changed is sent: the form carries the values it was rendered
    with (``*_was``), so a page left open while someone else (or the user's reply)
    changed the conversation does not put the old values back.
    """
    raw: dict[str, Any] = {}
    for name in ("status", "priority"):
        value = form.get(name)
        if value and value != form.get(f"{name}_was"):
            raw[name] = value
    if "tags" in form and form["tags"] != form.get("tags_was"):
        raw["tags"] = [t.strip() for t in form["tags"].split(",") if t.strip()]
    assignee = form.get("assignee", "keep")
    if assignee == "me":
        raw["assignee_id"] = agent.agent_id
    elif assignee == "none":
        raw["assignee_id"] = None
    elif assignee.startswith("agent:"):
        raw["assignee_id"] = assignee.removeprefix("agent:")  # the API checks membership
    return msgspec.convert(raw, ConversationUpdate)
