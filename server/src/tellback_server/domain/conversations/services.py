"""Conversations and messages, for end users and for agents.

Scoping lives here and only here: every client query is filtered by app and
end user, every agent query by the agent's apps. An id outside that scope is
simply not found (404), so nothing leaks whether it exists.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from types import SimpleNamespace
from typing import Any, NamedTuple, cast
from uuid import UUID

import msgspec
from sqlalchemy import (
    Integer,
    Select,
    String,
    TextClause,
    bindparam,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from uuid_utils.compat import uuid7

from tellback_server.db.base import table_of
from tellback_server.db.batch import Batched, member_name
from tellback_server.db.engine import LazyTx, SessionTx, Tx
from tellback_server.db.keys import answer_cte, key_params
from tellback_server.db.models import (
    Agent,
    AgentApp,
    Attachment,
    Conversation,
    EndUser,
    Event,
    Job,
    Message,
)
from tellback_server.db.prepared import Prepared, insert_into
from tellback_server.domain.apps.services import parse_settings
from tellback_server.domain.attachments.services import (
    AttachmentService,
    attachment_out,
    claim_in,
)
from tellback_server.domain.conversations.rules import (
    clean_body,
    clean_location,
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
    ConversationCreate,
    ConversationOut,
    ConversationUpdate,
    MessageCreate,
    MessageOut,
    UnreadOut,
)
from tellback_server.domain.conversations.views import (
    ConversationFields,
    MessageFields,
    Related,
    agent_conversation_out,
    agent_message_out,
    client_conversation_out,
    location_of,
    message_out,
)
from tellback_server.domain.events.records import (
    ROW_COLUMNS,
    EventDraft,
    EventRecord,
    emit,
    emit_in,
    event_row,
    notify_prefix,
    notifying,
    publish_at_commit,
)
from tellback_server.domain.identity.services import UserFields
from tellback_server.domain.push.delivery import (
    agents_listen,
    fanout_job,
    queue_fanout_in,
    user_listens,
)
from tellback_server.domain.webhooks.outbox import (
    DELIVERY_PARAMS,
    any_endpoint,
    delivery_ctes,
    endpoints_of,
    planned_deliveries,
)
from tellback_server.http.deps import AgentPrincipal, ClientPrincipal, SessionUser
from tellback_server.http.errors import AppError, NotFound, Unauthenticated, ValidationFailed
from tellback_server.http.idempotency import Answer
from tellback_server.http.pagination import (
    Page,
    after,
    check_limit,
    decode_cursor,
    keyset_order,
    next_cursor_for,
)
from tellback_server.jobs.notify import NOTIFY_CHANNEL as JOBS_CHANNEL
from tellback_server.jobs.queue import JOB_COLUMNS, job_row, wake_at_commit
from tellback_server.storage.base import ObjectStore

DETAIL_MESSAGES = 100


@dataclass(frozen=True, slots=True)
class _MessageViews:
    agent_msg: AgentMessageOut
    client_msg: MessageOut | None  # None for an internal note
    client_conv: ConversationOut | None


class ConversationClosed(AppError):
    status_code, code = 409, "conversation_closed"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _has_tag(dialect: str) -> TextClause:
    """Conversations carrying the tag ``:tag`` (case-insensitive; tags are a JSON array)."""
    if dialect == "postgresql":
        sql = (
            "EXISTS (SELECT 1 FROM jsonb_array_elements_text(conversations.tags) AS t(v) "
            "WHERE lower(t.v) = lower(:tag))"
        )
    else:
        sql = (
            "EXISTS (SELECT 1 FROM json_each(conversations.tags) AS t "
            "WHERE lower(t.value) = lower(:tag))"
        )
    return text(sql).bindparams(bindparam("tag", type_=String))


def _like(q: str) -> str:
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def message_events(
    conv: ConversationFields,
    message: MessageFields,
    last_public: MessageFields | None,
    authors: Related,
    user: UserFields,
    *,
    created: bool,
    status_changed: bool,
) -> tuple[list[EventDraft], _MessageViews]:
    """The events a new message makes and the views they carry (no database work)."""
    agent_conv = agent_conversation_out(conv, message, authors, user)
    agent_msg = agent_message_out(message, authors)
    client_conv = None
    if not message.internal or created or status_changed:
        client_conv = client_conversation_out(conv, last_public, authors)
    client_msg = None if message.internal else message_out(message, authors)
    agent_data = {"conversation": agent_conv, "message": agent_msg}
    client_data = {"conversation": client_conv, "message": client_msg}
    drafts: list[EventDraft] = []
    if created:
        drafts.append(
            EventDraft("conversation.created", conv.id, conv.end_user_id, agent_data, client_data)
        )
    else:
        drafts.append(
            EventDraft(
                "message.created",
                conv.id,
                conv.end_user_id,
                agent_data,
                None if client_msg is None else client_data,
            )
        )
    if status_changed:
        drafts.append(
            EventDraft(
                "conversation.updated",
                conv.id,
                conv.end_user_id,
                {"conversation": agent_conv},
                {"conversation": client_conv},
            )
        )
    return drafts, _MessageViews(agent_msg, client_msg, client_conv)


def unread_changed(conv: ConversationFields, total: int) -> EventDraft:
    """The end user's ``unread.changed`` event: ``total`` over all their conversations,
    and ``conv``'s own count."""
    return EventDraft(
        "unread.changed",
        conv.id,
        conv.end_user_id,
        None,
        {
            "unread_count": total,
            "conversation_id": conv.id,
            "conversation_unread_count": conv.user_unread_count,
        },
    )


class ConversationService:
    def __init__(self, db: AsyncSession, attachments: AttachmentService) -> None:
        self.db = db
        self.attachments = attachments

    # ----- shared -------------------------------------------------------------------------

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
        authors = Related(self.db, self.attachments)
        await authors.load(last.values())
        return [
            client_conversation_out(c, last.get(c.last_public_message_id), authors)  # type: ignore[arg-type]
            for c in convs
        ]

    async def _user_unread_total(self, app_id: UUID, end_user_id: UUID) -> int:
        total = await self.db.scalar(
            select(func.coalesce(func.sum(Conversation.user_unread_count), 0)).where(
                Conversation.app_id == app_id, Conversation.end_user_id == end_user_id
            )
        )
        return int(total or 0)

    async def _unread_draft(self, conv: Conversation) -> EventDraft:
        return unread_changed(conv, await self._user_unread_total(conv.app_id, conv.end_user_id))

    async def client_list(
        self, client: ClientPrincipal, cursor: str | None, limit: int
    ) -> Page[ConversationOut]:
        rows = await self._client_page(_client_list, client, cursor, limit)
        convs = [_Listed._make(r[:_LISTED]) for r in rows]
        authors = Related(self.db, self.attachments)
        lasts = [None if r[_LISTED] is None else _listed_message(r, authors) for r in rows[:limit]]
        await authors.load(m for m in lasts if m is not None)  # their attachments
        return Page(
            items=[
                client_conversation_out(c, m, authors)
                for c, m in zip(convs[:limit], lasts, strict=True)
            ],
            next_cursor=next_cursor_for([(c.public_activity_at, c.id) for c in convs], limit),
        )

    async def _client_page(
        self,
        page: Callable[..., Prepared],
        client: ClientPrincipal,
        cursor: str | None,
        limit: int,
        **params: Any,
    ) -> list[Any]:
        """``limit + 1`` rows of the end user's, of ``page`` (``_client_list`` or
        ``_client_messages``), after the ``cursor`` if any."""
        params.update(app_id=client.app_id, end_user_id=client.end_user_id)
        paging, params = _page_params(cursor, limit, **params)
        statement = page(after_cursor=paging, rows=limit + 1)
        rows: list[Any] = await self.db.run_sync(statement.execute, params)
        return rows

    async def client_get(self, client: ClientPrincipal, conv_id: UUID) -> ConversationOut:
        return (await self._client_outs([await self._client_conv(client, conv_id)]))[0]

    async def client_messages(
        self, client: ClientPrincipal, conv_id: UUID, cursor: str | None, limit: int
    ) -> Page[MessageOut]:
        rows = await self._client_page(
            _client_messages, client, cursor, limit, conversation_id=conv_id
        )
        if not rows:
            await self._client_conv(client, conv_id)  # a 404 unless it is theirs
        authors = Related(self.db, self.attachments)
        messages = [_listed_message(r, authors) for r in rows]
        await authors.load(messages[:limit])  # their attachments
        return Page(
            items=[message_out(m, authors) for m in messages[:limit]],
            next_cursor=next_cursor_for([(m.created_at, m.id) for m in messages], limit),
        )

    async def client_add_message(
        self, client: ClientPrincipal, conv_id: UUID, data: MessageCreate
    ) -> MessageOut:
        return await follow_up_in(SessionTx(self.db), self.attachments.store, client, conv_id, data)

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
        if self.db.get_bind().dialect.name == "postgresql":  # the total: as a reply does
            await self.db.execute(
                select(EndUser.id)
                .where(EndUser.id == client.end_user_id)
                .with_for_update(key_share=True)
            )
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
        await emit(self.db, conv.app_id, [await self._unread_draft(conv)])

    async def client_unread(self, client: ClientPrincipal) -> UnreadOut:
        return UnreadOut(
            unread_count=await self._user_unread_total(client.app_id, client.end_user_id)
        )

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
        authors = Related(self.db, self.attachments)
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
            agent_conversation_out(c, last.get(c.last_message_id), authors, users[c.end_user_id])  # type: ignore[arg-type]
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
        tag: str | None = None,
    ) -> Page[AgentConversation]:
        check_limit(limit)
        apps = agent.app_ids if app_id is None else agent.app_ids & {app_id}
        if not apps:
            return Page(items=[], next_cursor=None)
        paging, params = _page_params(cursor, limit, **_apps_params(apps))
        filters = {
            "status": status,
            "assignee_id": assignee_id,
            "tag": tag.strip() if tag else None,
            "pattern": _like(q.strip()) if q else None,
        }
        params.update((k, v) for k, v in filters.items() if v is not None)
        statement = _inbox_page(
            len(apps),
            self.db.get_bind().dialect.name,
            *(v is not None for v in filters.values()),
            after_cursor=paging,
            rows=limit + 1,
        )
        rows: list[Any] = await self.db.run_sync(statement.execute, params)
        convs = [_InboxRow._make(r[:_INBOX]) for r in rows]
        authors = Related(self.db, self.attachments)
        lasts = [
            None if r[_INBOX_USER] is None else _listed_message(r, authors) for r in rows[:limit]
        ]
        await authors.load(m for m in lasts if m is not None)  # their attachments
        return Page(
            items=[
                agent_conversation_out(c, m, authors, _User._make(r[_INBOX:_INBOX_USER]))
                for c, m, r in zip(convs[:limit], lasts, rows[:limit], strict=True)
            ],
            next_cursor=next_cursor_for([(c.last_activity_at, c.id) for c in convs], limit),
        )

    async def _agent_messages(
        self, agent: AgentPrincipal, conv_id: UUID, cursor: str | None, limit: int
    ) -> tuple[list[_ListedMessage], Related, str | None]:
        """A page of the conversation's messages (none unless it is of the agent's apps),
        their authors and attachments, and the next page's cursor."""
        if not agent.app_ids:
            return [], Related(self.db, self.attachments), None
        paging, params = _page_params(
            cursor, limit, conversation_id=conv_id, **_apps_params(agent.app_ids)
        )
        statement = _agent_messages(len(agent.app_ids), after_cursor=paging, rows=limit + 1)
        authors = Related(self.db, self.attachments)
        rows: list[Any] = await self.db.run_sync(statement.execute, params)
        messages = [_listed_message(r, authors) for r in rows]
        await authors.load(messages[:limit])
        nxt = next_cursor_for([(m.created_at, m.id) for m in messages], limit)
        return messages[:limit], authors, nxt

    async def agent_get(self, agent: AgentPrincipal, conv_id: UUID) -> AgentConversationDetail:
        if not agent.app_ids:
            raise NotFound("no such conversation")
        params = {"conversation_id": conv_id, **_apps_params(agent.app_ids)}
        rows = await self.db.run_sync(_detail(len(agent.app_ids)).execute, params)
        if not rows:
            raise NotFound("no such conversation")
        row = rows[0]
        messages, authors, nxt = await self._agent_messages(agent, conv_id, None, DETAIL_MESSAGES)
        last = None if row[_DETAIL_MESSAGE] is None else _listed_message(row, authors)
        if last is not None:
            await authors.load([last])  # its attachments, when not on this page
        custom_fields, context, location = row[_INBOX:_DETAIL_USER]
        summary = agent_conversation_out(
            _InboxRow._make(row[:_INBOX]),
            last,
            authors,
            _User._make(row[_DETAIL_USER:_DETAIL_MESSAGE]),
        )
        return AgentConversationDetail(
            **msgspec.structs.asdict(summary),
            custom_fields=dict(custom_fields or {}),
            context=dict(context or {}),
            location=location_of(location),
            messages=[agent_message_out(m, authors) for m in messages],
            messages_next_cursor=nxt,
        )

    async def agent_messages(
        self, agent: AgentPrincipal, conv_id: UUID, cursor: str | None, limit: int
    ) -> Page[AgentMessageOut]:
        messages, authors, nxt = await self._agent_messages(agent, conv_id, cursor, limit)
        if not messages:
            await self._agent_conv(agent, conv_id)  # a 404 unless it is of the agent's apps
        return Page(items=[agent_message_out(m, authors) for m in messages], next_cursor=nxt)

    async def agent_reply(
        self, agent: AgentPrincipal, conv_id: UUID, data: AgentMessageCreate
    ) -> AgentMessageOut:
        return await reply_in(SessionTx(self.db), self.attachments.store, agent, conv_id, data)

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
        out = (await self._agent_outs([conv]))[0]
        client_out = (await self._client_outs([conv]))[0]
        await emit(
            self.db,
            conv.app_id,
            [
                EventDraft(
                    "conversation.updated",
                    conv.id,
                    conv.end_user_id,
                    {"conversation": out},
                    {"conversation": client_out},
                )
            ],
        )
        return out

    async def agent_read(self, agent: AgentPrincipal, conv_id: UUID) -> None:
        conv = await self._agent_conv(agent, conv_id)
        await self.db.execute(
            update(Conversation).where(Conversation.id == conv.id).values(agent_unread_count=0)
        )


# ----- the end user's reads: one statement per page ------------------------------------------
# Conversations with their last public message, or a conversation's public messages, each
# with its author's name and only the columns the client views read. Through the ORM
# (every column, the identity map, a query per kind of row) a list page cost 3-4 ms.


class _Listed(NamedTuple):
    id: UUID
    status: str
    subject: str | None
    category: str | None
    tags: list[str]
    custom_fields: dict[str, Any]
    location: dict[str, Any] | None
    user_unread_count: int
    created_at: dt.datetime
    public_activity_at: dt.datetime


class _ListedMessage(NamedTuple):
    id: UUID
    conversation_id: UUID
    author_type: str
    author_user_id: UUID | None
    author_agent_id: UUID | None
    body: str | None
    internal: bool
    attachment_ids: list[str]
    location: dict[str, Any] | None
    created_at: dt.datetime


_LISTED = len(_Listed._fields)
_MESSAGE_WIDTH = len(_ListedMessage._fields) + 2  # with the author's two names
_CONVS, _MSGS = table_of(Conversation), table_of(Message)


def _message_columns() -> tuple[list[Any], Any]:
    """A message's columns and its author's names (user, agent; the last two), and the
    joins that bring the names to ``_MSGS``."""
    users, agents = table_of(EndUser), table_of(Agent)
    columns = [*(_MSGS.c[k] for k in _ListedMessage._fields), users.c.name, agents.c.name]
    return columns, lambda joined: joined.outerjoin(
        users, users.c.id == _MSGS.c.author_user_id
    ).outerjoin(agents, agents.c.id == _MSGS.c.author_agent_id)


def _listed_message(row: Sequence[Any], authors: Related) -> _ListedMessage:
    """The message in a row that ends with ``_message_columns()``; its author's name
    goes into ``authors``."""
    m = _ListedMessage._make(row[-_MESSAGE_WIDTH:-2])
    if m.author_user_id is not None:
        authors.users[m.author_user_id] = row[-2]
    if m.author_agent_id is not None:
        authors.agents[m.author_agent_id] = row[-1]
    return m


def _paged(
    stmt: Any, at: Any, id_: Any, *, after_cursor: bool, descending: bool, rows: int
) -> Prepared:
    """``stmt`` ordered by (at, id), after ``(:at, :after_id)`` with ``after_cursor``, at
    most ``rows`` rows, prepared.

    The row count is written into the statement, not passed: PostgreSQL plans a prepared
    statement once for all its runs only when that plan costs no more than the one it
    makes for the parameters at hand, and with ``LIMIT $n`` it cannot know the plan
    stops early, so it planned every run anew: 260-360 us of its CPU per list or inbox
    page, against 80-90 us with the count written (the plan itself took 0.1 ms to run).
    A statement per page size, then (the sizes clients ask for are few).

    While a table's statistics lag its rows (a new installation's first minute), the
    one plan can be a poor one, a sort of all the app's conversations (1.1 ms a page at
    670 of them). It lasts only until the next ANALYZE of the table, autovacuum's or
    anyone's, after which PostgreSQL plans the statement again."""
    stmt = stmt.order_by(*keyset_order(at, id_, descending=descending))
    stmt = stmt.limit(literal_column(str(int(rows)), Integer))
    if after_cursor:
        key = bindparam("at", type_=at.type), bindparam("after_id", type_=id_.type)
        stmt = stmt.where(after(at, id_, *key, descending=descending))
    return Prepared(stmt)


def _page_params(cursor: str | None, limit: int, **params: Any) -> tuple[bool, dict[str, Any]]:
    """Whether a page starts after a cursor, and the parameters of its statement (which
    reads ``limit + 1`` rows: one more tells whether there is a next page)."""
    check_limit(limit)
    if (key := decode_cursor(cursor)) is None:
        return False, params
    params["at"], params["after_id"] = key.at, key.id
    return True, params


@lru_cache(maxsize=256)
def _client_list(*, after_cursor: bool, rows: int) -> Prepared:
    """The end user's conversations, each with its last public message (or NULLs)."""
    columns, with_names = _message_columns()
    stmt = (
        select(*(_CONVS.c[k] for k in _Listed._fields), *columns)
        .select_from(
            with_names(_CONVS.outerjoin(_MSGS, _MSGS.c.id == _CONVS.c.last_public_message_id))
        )
        .where(
            _CONVS.c.app_id == bindparam("app_id", type_=_CONVS.c.app_id.type),
            _CONVS.c.end_user_id == bindparam("end_user_id", type_=_CONVS.c.end_user_id.type),
        )
    )
    at, id_ = _CONVS.c.public_activity_at, _CONVS.c.id
    return _paged(stmt, at, id_, after_cursor=after_cursor, descending=True, rows=rows)


def _conversation_messages(*where: Any) -> Any:
    """The messages of conversation ``:conversation_id`` with their authors' names,
    joined to the conversation for ``where``."""
    columns, with_names = _message_columns()
    return (
        select(*columns)
        .select_from(with_names(_MSGS.join(_CONVS, _CONVS.c.id == _MSGS.c.conversation_id)))
        .where(
            _MSGS.c.conversation_id == bindparam("conversation_id", type_=_MSGS.c.id.type),
            *where,
        )
    )


@lru_cache(maxsize=256)
def _client_messages(*, after_cursor: bool, rows: int) -> Prepared:
    """The public messages of a conversation of the end user's, oldest first."""
    stmt = _conversation_messages(
        _MSGS.c.internal.is_(False),
        _CONVS.c.app_id == bindparam("app_id", type_=_CONVS.c.app_id.type),
        _CONVS.c.end_user_id == bindparam("end_user_id", type_=_CONVS.c.end_user_id.type),
    )
    at, id_ = _MSGS.c.created_at, _MSGS.c.id
    return _paged(stmt, at, id_, after_cursor=after_cursor, descending=False, rows=rows)


# ----- sending feedback: the ingest hot path -------------------------------------------------
# Core statements built once, run in two Tx.run calls.

_CONVERSATION_COLUMNS = (
    "id",
    "app_id",
    "end_user_id",
    "status",
    "priority",
    "subject",
    "category",
    "tags",
    "custom_fields",
    "context",
    "location",
    "assignee_id",
    "last_message_id",
    "last_activity_at",
    "last_public_message_id",
    "public_activity_at",
    "message_count",
    "user_unread_count",
    "user_read_at",
    "agent_unread_count",
    "created_at",
    "updated_at",
)
_MESSAGE_COLUMNS = (
    "id",
    "conversation_id",
    "app_id",
    "author_type",
    "author_user_id",
    "author_agent_id",
    "body",
    "internal",
    "attachment_ids",
    "location",
    "created_at",
    "updated_at",
)
_INSERT_CONVERSATION = insert_into(table_of(Conversation), _CONVERSATION_COLUMNS)
_INSERT_MESSAGE = insert_into(table_of(Message), _MESSAGE_COLUMNS)


_User = SessionUser  # the end user as the views show them (the columns user_out reads)
_USERS = table_of(EndUser)


def _user_select(*asked: Any) -> Select[Any]:
    """The end user (``:id``) as the views show them, then ``asked`` (one column each,
    read along: a statement less each)."""
    return select(*(_USERS.c[k] for k in _User._fields), *asked).where(
        _USERS.c.id == bindparam("id")
    )


# The end user, whether any agent's phone may hear of the new feedback and whether the app
# has a webhook endpoint.
_USER_SELECT = _user_select(
    agents_listen().label("agents_listen"), any_endpoint().label("any_endpoint")
)
# The same, when the user still writes as themself (SQLite: its writer lock serializes).
_LIVE_USER = Prepared(_USER_SELECT.where(_USERS.c.merged_into_id.is_(None)))
# A write by an end user who signed in as another (their anonymous user was merged into
# that one) or was erased after the session was checked: the SDK's new session sends it
# again, as the user they are now.
SESSION_ENDED = (
    "this session's user has signed in as another user or was erased; create a new session"
)
# A new feedback on PostgreSQL to an app with webhooks (_create_alone) reads the end user
# and the endpoints themselves (its statement asks whether an agent listens).
_FEEDBACK_READ = Prepared(_user_select(endpoints_of().label("endpoints")))


# ----- the agents' inbox: one statement per page ---------------------------------------------
# Conversations with their end user and their last message (an internal note included) with
# its author's name; never the device context (a KiB of JSON per row), which only the
# detail shows. The console reloads the inbox on every event an agent's stream gets, so it
# is read like the end user's list, not through the ORM. Its filters vary: they are added
# per request to the statement built once (SQLAlchemy caches the compiled forms by shape).


class _InboxRow(NamedTuple):
    id: UUID
    app_id: UUID
    status: str
    priority: str
    subject: str | None
    category: str | None
    tags: list[str]
    assignee_id: UUID | None
    message_count: int
    agent_unread_count: int
    created_at: dt.datetime
    updated_at: dt.datetime
    last_activity_at: dt.datetime


_INBOX = len(_InboxRow._fields)
_INBOX_USER = _INBOX + len(_User._fields)  # the row's message columns start here


def _apps_in(count: int) -> Any:
    """The conversation is of one of ``count`` apps: ``:app_0``, ``:app_1``, ...
    (:func:`_apps_params`). A parameter each, not an expanding list: the statement is
    prepared once per count (an agent serves a handful of apps)."""
    app_id = _CONVS.c.app_id
    return app_id.in_([bindparam(f"app_{i}", type_=app_id.type) for i in range(count)])


def _apps_params(app_ids: Iterable[UUID]) -> dict[str, UUID]:
    return {f"app_{i}": a for i, a in enumerate(sorted(app_ids))}


def _inbox(apps: int, *detail: str) -> Select[Any]:
    """The agents' inbox over ``apps`` apps (:func:`_apps_in`), unfiltered and unordered;
    a row is ``_InboxRow``'s columns, the ``detail`` columns of the conversation, the end
    user's (``_User``), then ``_message_columns()`` of the last message."""
    owners = table_of(EndUser).alias("owner")
    columns, with_names = _message_columns()
    return (
        select(
            *(_CONVS.c[k] for k in (*_InboxRow._fields, *detail)),
            *(owners.c[k] for k in _User._fields),
            *columns,
        )
        .select_from(
            with_names(
                _CONVS.join(owners, owners.c.id == _CONVS.c.end_user_id).outerjoin(
                    _MSGS, _MSGS.c.id == _CONVS.c.last_message_id
                )
            )
        )
        .where(_apps_in(apps))
    )


# Built on first use, per shape: the number of apps, the filters given, a cursor or not,
# the page size. (The shapes an inbox meets are few; the cache's bound only stops an agent
# of hundreds of apps, each count a shape, from growing it for good.)


@lru_cache(maxsize=1024)
def _inbox_page(
    apps: int,
    dialect: str,
    status: bool,
    assignee: bool,
    tag: bool,
    q: bool,
    *,
    after_cursor: bool,
    rows: int,
) -> Prepared:
    """A page of the inbox with the filters asked: ``:status``, ``:assignee_id``, ``:tag``,
    ``:pattern`` (``q``: in the subject or any message's body, a LIKE pattern)."""
    stmt = _inbox(apps)
    if status:
        stmt = stmt.where(_CONVS.c.status == bindparam("status", type_=_CONVS.c.status.type))
    if assignee:
        assignee_id = _CONVS.c.assignee_id
        stmt = stmt.where(assignee_id == bindparam("assignee_id", type_=assignee_id.type))
    if tag:
        stmt = stmt.where(_has_tag(dialect))
    if q:
        pattern = bindparam("pattern", type_=String)
        matching = _MSGS.alias("matching")  # not the joined last message
        body_match = exists().where(
            matching.c.conversation_id == _CONVS.c.id,
            matching.c.body.ilike(pattern, escape="\\"),
        )
        stmt = stmt.where(or_(_CONVS.c.subject.ilike(pattern, escape="\\"), body_match))
    at, id_ = _CONVS.c.last_activity_at, _CONVS.c.id
    return _paged(stmt, at, id_, after_cursor=after_cursor, descending=True, rows=rows)


@lru_cache(maxsize=256)
def _agent_messages(apps: int, *, after_cursor: bool, rows: int) -> Prepared:
    """The messages of a conversation of the agent's ``apps`` apps, internal notes too,
    oldest first."""
    stmt = _conversation_messages(_apps_in(apps))
    at, id_ = _MSGS.c.created_at, _MSGS.c.id
    return _paged(stmt, at, id_, after_cursor=after_cursor, descending=False, rows=rows)


_DETAIL = ("custom_fields", "context", "location")
_DETAIL_USER = _INBOX + len(_DETAIL)  # in a detail row, the end user's columns start here
_DETAIL_MESSAGE = _DETAIL_USER + len(_User._fields)  # and the last message's here


@lru_cache(maxsize=256)
def _detail(apps: int) -> Prepared:
    """One conversation ``:conversation_id`` of the agent's ``apps`` apps, as the inbox
    shows it with the ``_DETAIL`` columns."""
    conv_id = bindparam("conversation_id", type_=_CONVS.c.id.type)
    return Prepared(_inbox(apps, *_DETAIL).where(_CONVS.c.id == conv_id))


def _gated_insert(
    gate: Any, model: type[Any], columns: Sequence[str], names: str, *where: Any
) -> Any:
    """INSERT INTO ``model``'s table ``columns`` from parameters ``<names><column>``, with
    no row when ``gate`` (a CTE, or None) has none or ``where`` does not hold."""
    table = table_of(model)
    values = select(*(bindparam(f"{names}{k}", type_=table.c[k].type) for k in columns))
    if gate is not None:
        values = values.select_from(gate)
    return insert(table).from_select(list(columns), values.where(*where))


def _user_gate(prefix: str, *, fresh: bool) -> Any:
    """A row when the end user (``c_end_user_id``) still writes as themself: not merged
    into the user they signed in as, not erased. It locks them (``FOR KEY SHARE``, as
    the feedback's own foreign key does, only first): a merge or an erasure
    (identity/services.py ``lock_end_users``) waits for the write, or the write for it
    and then finds no row (PostgreSQL reads the changed user again). With ``fresh``,
    only when the user is as the session's check read them (``user_updated_at``:
    every change of theirs moves it) and the app (``c_app_id``) has no enabled webhook
    endpoint: what a feedback written without a read of its own (``_create_alone``)
    took for granted."""
    users, conversations = _USERS, table_of(Conversation)
    user_id = bindparam(f"{prefix}c_end_user_id", type_=conversations.c.end_user_id.type)
    holds = [users.c.id == user_id, users.c.merged_into_id.is_(None)]
    if fresh:
        app_id = bindparam(f"{prefix}c_app_id", type_=conversations.c.app_id.type)
        seen = bindparam(f"{prefix}user_updated_at", type_=users.c.updated_at.type)
        holds += [users.c.updated_at == seen, ~any_endpoint(app_id)]
    return (
        select(literal(1).label("live"))
        .select_from(users)
        .where(*holds)
        .with_for_update(of=users, read=True, key_share=True)
    )


def _insert_both() -> Prepared:
    """PostgreSQL: the conversation and its first message, inserted by a statement that
    reads the end user (``_USER_SELECT``): one round trip for three statements. Nothing is
    written and no row comes back unless the user still writes as themself
    (:func:`_user_gate`). Data-modifying CTEs run whether or not the query refers to
    them; the query does not see their rows, nor does it need to. Parameters
    ``c_<column>``, ``m_<column>``, ``id``, ``app_id``; the message's foreign key is
    checked at the end of the statement."""
    gate = _user_gate("", fresh=False).cte("live")
    conv = _gated_insert(gate, Conversation, _CONVERSATION_COLUMNS, "c_")
    message = _gated_insert(gate, Message, _MESSAGE_COLUMNS, "m_")
    return Prepared(
        _USER_SELECT.where(exists(select(gate.c.live))).add_cte(
            gate, conv.cte("new_conversation"), message.cte("new_message")
        )
    )


_INSERT_BOTH = _insert_both()


def _store_feedback(
    db: Session,
    client: ClientPrincipal,
    attachment_ids: Sequence[str],
    conv: dict[str, Any],
    msg: dict[str, Any],
) -> tuple[_User, list[Attachment], bool]:
    """The rows of a new feedback; returns the end user, the claimed attachments and
    whether the app has a webhook endpoint."""
    attachments = claim_in(db, client.app_id, client.end_user_id, attachment_ids)
    attachments.sort(key=lambda a: (a.created_at, a.id))  # as lists show them
    msg["attachment_ids"] = [str(a.id) for a in attachments]
    who = {"id": client.end_user_id, "app_id": client.app_id}
    if db.get_bind().dialect.name == "postgresql":
        both = {f"c_{k}": v for k, v in conv.items()}
        both.update({f"m_{k}": v for k, v in msg.items()}, **who)
        found = _INSERT_BOTH.execute(db, both)
    else:  # SQLite has no data-modifying CTEs (and no round trips to save)
        found = _LIVE_USER.execute(db, who)
        if found:
            _INSERT_CONVERSATION.execute(db, conv)
            _INSERT_MESSAGE.execute(db, msg)
    if not found:  # merged into the user they signed in as, or erased, since the check
        raise Unauthenticated(SESSION_ENDED)
    [(*user, listening, hooks)] = found
    for att in attachments:
        att.message_id = msg["id"]  # flushed at commit
    queue_fanout_in(db, msg["id"], "agents", listening=bool(listening), first=True)
    return _User(*user), attachments, bool(hooks)


def _new_feedback(count: int, *, keyed: bool, hooked: bool, fresh: bool = False) -> Prepared:
    """PostgreSQL: ``count`` whole new feedbacks in one statement, which commits by
    itself (``db/batch.py``; ``count`` is 1 when ``hooked``). For each, parameters named
    by ``member_name`` (``i``, ...): the conversation, its message, the event (queuing its
    NOTIFY), the agents' push job when an agent's phone may hear of it
    (``agents_listen``), with ``hooked`` the webhook deliveries ``planned_deliveries``
    planned with their jobs (its parameters unnamed, shared), and the NOTIFY that wakes
    workers when a job was queued (when no endpoint wants the event, the statement goes
    without the deliveries' CTEs, which cost PostgreSQL work even with nothing to
    write). ``keyed``: also the idempotency key with its answer (``db/keys.py``), which
    every other row of that feedback depends on: when its key is taken, none of them is
    written and no row comes back for it. ``fresh`` (not with ``hooked``): nothing of it
    is written, and no row comes back, either unless the user is as the session's check
    read them; nor, in any case, unless the user still writes as themself
    (:func:`_user_gate`).
    Otherwise one row for each: its index, its event's id and whether its push job was
    queued. Parameters ``c_``, ``m_``, ``e_`` and ``j_<column>``, with ``keyed``
    ``key_<column>``, with ``fresh`` ``user_updated_at``, and ``notify_prefix``
    (shared); the foreign keys between the new rows are checked at the end of the
    statement."""
    assert count == 1 or not hooked
    assert not (fresh and hooked)
    writes: list[Any] = []
    queued: list[Any] = []
    answered: list[Any] = []
    events, conversations = table_of(Event), table_of(Conversation)
    for i in range(count):
        prefix = member_name(i, "")
        gate = _user_gate(prefix, fresh=fresh).cte(f"{prefix}live")
        if keyed:
            gate = answer_cte(prefix, gate)
        rows = partial(_gated_insert, gate)
        conv = rows(Conversation, _CONVERSATION_COLUMNS, f"{prefix}c_")
        message = rows(Message, _MESSAGE_COLUMNS, f"{prefix}m_")
        app_id = bindparam(f"{prefix}c_app_id", type_=conversations.c.app_id.type)
        job = rows(Job, JOB_COLUMNS, f"{prefix}j_", agents_listen(app_id))
        event = (
            notifying(rows(Event, ROW_COLUMNS, f"{prefix}e_"))
            .returning(events.c.type, events.c.app_id, events.c.created_at)
            .cte(f"{prefix}new_event")
        )
        writes += [conv.cte(f"{prefix}new_conversation"), message.cte(f"{prefix}new_message")]
        new_job = job.returning(table_of(Job).c.id).cte(f"{prefix}new_job")
        queued.append(select(new_job.c.id))
        its_job = select(func.count()).select_from(new_job).scalar_subquery()
        answered.append(select(literal(i).label("member"), event.c.id, its_job.label("queued")))
        if hooked:
            deliveries, delivery_jobs = delivery_ctes(event)
            writes.append(deliveries)
            queued.append(select(delivery_jobs.c.id))
    # One NOTIFY wakes other processes' workers (PostgreSQL sends a repeat once).
    woken = select(func.count(func.pg_notify(literal(JOBS_CHANNEL), literal("")))).select_from(
        union_all(*queued).subquery() if len(queued) > 1 else queued[0].subquery()
    )
    result = (union_all(*answered) if count > 1 else answered[0]).subquery()
    return Prepared(select(*result.c, woken.scalar_subquery()).add_cte(*writes))


# Unhooked feedback from concurrent requests goes in batches (keyed or not, fresh or not),
# hooked alone.
_NEW_FEEDBACK = {
    (keyed, fresh): Batched(
        partial(_new_feedback, keyed=keyed, hooked=False, fresh=fresh),
        shared=("notify_prefix",),
    )
    for keyed in (False, True)
    for fresh in (False, True)
}
_NEW_HOOKED_FEEDBACK = {
    keyed: Batched(
        partial(_new_feedback, keyed=keyed, hooked=True),
        shared=("notify_prefix", *DELIVERY_PARAMS),
        sizes=(1,),
    )
    for keyed in (False, True)
}


async def _create_alone(
    tx: LazyTx,
    client: ClientPrincipal,
    conv: dict[str, Any],
    msg: dict[str, Any],
    answer: Answer | None,
) -> ConversationOut | None:
    """PostgreSQL, feedback without attachments: at most two statements that each commit
    by themselves, with no transaction around them; the last writes everything
    (``_new_feedback``, with other requests' feedback when they come together:
    ``db/batch.py``), so the feedback, its event, its push job, its webhook deliveries
    and its key are stored together or not at all, as in a transaction.

    For an app with no webhook endpoint, as the session's check found it, that one
    statement is all (``fresh``): the views take the end user as that check read them
    (``ClientPrincipal.user``, when it kept them), and the statement writes only if
    both still hold (:func:`_user_gate`); a request it carries never takes a
    connection of its own. Otherwise a read comes first: the end user (for the views)
    and the app's endpoints (for the deliveries). One or two round trips where a
    transaction takes four or more (BEGIN, two statements, the endpoints and
    deliveries when the app has any, COMMIT).

    None, with nothing written, when the end user is gone or changed since the check,
    the app has an endpoint the check did not see, or the key is taken: the
    transaction's way (:func:`_store_feedback`) handles those (a replay, an expired key
    taken again). The transaction's commit hooks run when it ends (events published,
    workers woken)."""
    user = None if client.app_hooked else client.user
    fresh, endpoints = user is not None, None
    if user is None:
        who = {"id": client.end_user_id, "app_id": client.app_id}
        found = await _FEEDBACK_READ.fetch_alone(await tx.connected(), who)
        if not found:
            return None
        [(*columns, endpoints)] = found
        user = _User(*columns)
    stored = _NewMessage(conv, msg, user, [], 0, False, bool(endpoints))
    [draft], views = _message_views(stored, Related(), created=True)
    assert views.client_conv is not None  # the user's own new conversation
    event = event_row(client.app_id, draft, _now())
    params = {f"c_{k}": v for k, v in conv.items()}
    params.update({f"m_{k}": v for k, v in msg.items()})
    params.update({f"e_{k}": v for k, v in event.items()})
    params.update(
        {f"j_{k}": v for k, v in job_row(**fanout_job(msg["id"], "agents", first=True)).items()}
    )
    params["notify_prefix"] = notify_prefix(tx)
    if fresh:
        params["user_updated_at"] = client.user_updated_at
    deliveries = planned_deliveries(endpoints, draft.type)
    params.update(deliveries)
    if answer is not None:
        params.update(key_params(answer.produced(views.client_conv)))
    keyed = answer is not None
    if deliveries["w_ids"]:
        written = await _NEW_HOOKED_FEEDBACK[keyed].alone(await tx.connected(), params)
    else:
        written = await _NEW_FEEDBACK[keyed, fresh].fetch(tx, params)
    if not written:  # gone, changed or taken: the transaction's way sorts that out
        return None
    event_id, queued = written[0][:2]
    if answer is not None:
        answer.claimed = True
    publish_at_commit(tx, [EventRecord(id=event_id, **event)])
    if queued or deliveries["w_ids"]:
        wake_at_commit(tx)
    return views.client_conv


async def create_feedback(
    tx: Tx,
    store: ObjectStore,
    client: ClientPrincipal,
    data: ConversationCreate,
    answer: Answer | None = None,
) -> ConversationOut:
    """A new conversation with its first message, the agents' push job and the events;
    with ``answer``, the request's idempotency key is written with the events (one
    statement on PostgreSQL)."""
    settings = parse_settings(client.app_settings)
    validate_category(settings, data.category)
    custom_fields = validate_custom_fields(settings, data.custom_fields)
    context = validate_context(data.context)
    body = clean_body(data.body, required=True)
    now = _now()
    conv_id, message_id = uuid7(), uuid7()
    location = clean_location(data.location)
    subject = data.subject.strip() if data.subject and data.subject.strip() else None
    conv: dict[str, Any] = {
        "id": conv_id,
        "app_id": client.app_id,
        "end_user_id": client.end_user_id,
        "status": "open",
        "priority": "normal",
        "subject": subject,
        "category": data.category,
        "tags": clean_tags(data.tags),
        "custom_fields": custom_fields,
        "context": context,
        "location": location,
        "assignee_id": None,
        "last_message_id": message_id,
        "last_activity_at": now,
        "last_public_message_id": message_id,
        "public_activity_at": now,
        "message_count": 1,
        "user_unread_count": 0,
        "user_read_at": None,
        "agent_unread_count": 1,
        "created_at": now,
        "updated_at": now,
    }
    msg: dict[str, Any] = {
        "id": message_id,
        "conversation_id": conv_id,
        "app_id": client.app_id,
        "author_type": "user",
        "author_user_id": client.end_user_id,
        "author_agent_id": None,
        "body": body,
        "internal": False,
        "attachment_ids": [],
        "location": location,
        "created_at": now,
        "updated_at": now,
    }
    if not data.attachment_ids and isinstance(tx, LazyTx):  # PostgreSQL
        created = await _create_alone(tx, client, conv, msg, answer)
        if created is not None:
            return created
    user, attachments, hooks = await tx.run(_store_feedback, client, data.attachment_ids, conv, msg)
    stored = _NewMessage(conv, msg, user, attachments, 0, False, hooks)
    views = await _message_events_in(tx, store, stored, created=True, answer=answer)
    assert views.client_conv is not None  # the user's own new conversation
    return views.client_conv


# ----- a new message in a conversation: an agent's reply, an end user's follow-up -----------
# Core statements built once, run in two Tx.run calls: the conversation (locked) with what
# the views and the outbox need, the message, the conversation's new state and the push job;
# then the events.

# What the views and the UPDATE read: every column but the device context (the largest, in
# no view), the user's read marker and the last message's id (which a new message sets).
_MESSAGE_TARGET = tuple(
    k for k in _CONVERSATION_COLUMNS if k not in {"context", "user_read_at", "last_message_id"}
)


def _conversation_read(*asked: Any, lock_user: bool = False) -> Prepared:
    """The conversation (``id``), locked on PostgreSQL, its end user as the views show
    them, whether the app has webhooks, then ``asked`` (one column each). With
    ``lock_user``, the end user is locked too (``FOR NO KEY UPDATE``, which their own
    writes' ``FOR KEY SHARE`` does not wait for): changes of their unread total then
    go one at a time, each seeing the one before."""
    lock = {"of": [_CONVS, _USERS], "key_share": True} if lock_user else {"of": _CONVS}
    return Prepared(
        select(
            *(_CONVS.c[k] for k in _MESSAGE_TARGET),
            *(_USERS.c[k] for k in _User._fields),
            any_endpoint(_CONVS.c.app_id).label("any_endpoint"),
            *asked,
        )
        .select_from(_CONVS.join(_USERS, _USERS.c.id == _CONVS.c.end_user_id))
        .where(_CONVS.c.id == bindparam("id", type_=_CONVS.c.id.type))
        .with_for_update(**lock)  # SQLite has no FOR UPDATE: its writer lock serializes
    )


@dataclass(frozen=True, slots=True)
class _Target:
    """A conversation read by :func:`_conversation_read`, as a dict the new message's
    changes go into."""

    conv: dict[str, Any]
    user: _User
    has_endpoint: bool
    asked: tuple[Any, ...]


def _read_target(db: Session, statement: Prepared, params: dict[str, Any]) -> _Target | None:
    rows = statement.execute(db, params)
    if not rows:
        return None
    width, row = len(_MESSAGE_TARGET), rows[0]
    users = width + len(_User._fields)
    conv = dict(zip(_MESSAGE_TARGET, row[:width], strict=True))
    return _Target(conv, _User(*row[width:users]), bool(row[users]), tuple(row[users + 1 :]))


# A reply: the end user locked along (their unread total changes), and whether any device
# of theirs may hear of it.
_REPLY_READ = _conversation_read(
    user_listens(_CONVS.c.end_user_id).label("user_listens"), lock_user=True
)
# Asked along for a follow-up: whether an agent's phone may hear of it (``app_id``).
_FOLLOW_UP_READ = _conversation_read(agents_listen().label("agents_listen"))
_CONVERSATION_UPDATE_STATEMENT = (
    update(_CONVS)
    .where(_CONVS.c.id == bindparam("conv_id", type_=_CONVS.c.id.type))
    .values(
        {
            k: bindparam(k, type_=_CONVS.c[k].type)
            for k in (
                "status",
                "message_count",
                "user_unread_count",
                "agent_unread_count",
                "last_message_id",
                "last_activity_at",
                "last_public_message_id",
                "public_activity_at",
                "updated_at",
            )
        }
    )
)
_CONVERSATION_UPDATE = Prepared(_CONVERSATION_UPDATE_STATEMENT)


def _reply_update() -> Prepared:
    """The conversation's update, returning the end user's unread total after it: the
    other conversations' counts as this statement finds them (it runs after the reply
    locked the user: every change before it has committed) and this one's new count.
    Read along with the conversation instead, a reply that waited for the lock still
    saw the counts from before the wait."""
    others = table_of(Conversation).alias("others")
    theirs = (
        select(func.coalesce(func.sum(others.c.user_unread_count), 0))
        .where(
            others.c.app_id == _CONVS.c.app_id,
            others.c.end_user_id == _CONVS.c.end_user_id,
            others.c.id != _CONVS.c.id,
        )
        .scalar_subquery()
    )
    total = (theirs + _CONVS.c.user_unread_count).label("unread_total")
    return Prepared(_CONVERSATION_UPDATE_STATEMENT.returning(total))


_REPLY_UPDATE = _reply_update()
# SQLite (whose RETURNING SQLAlchemy writes unqualified, which a subquery would read as
# its own columns): the total read after the update, in the writer's transaction.
_UNREAD_TOTAL = Prepared(
    select(func.coalesce(func.sum(_CONVS.c.user_unread_count), 0)).where(
        _CONVS.c.app_id == bindparam("app_id", type_=_CONVS.c.app_id.type),
        _CONVS.c.end_user_id == bindparam("end_user_id", type_=_CONVS.c.end_user_id.type),
    )
)


@dataclass(frozen=True, slots=True)
class _NewMessage:
    """A new message's rows as stored, and what its events need."""

    conv: dict[str, Any]
    msg: dict[str, Any]
    user: _User
    attachments: list[Attachment]
    unread_total: int  # the user's, after a reply; unused otherwise
    status_changed: bool
    has_endpoint: bool


def _insert_message(
    db: Session, conv: dict[str, Any], attachments: Sequence[Attachment], **fields: Any
) -> dict[str, Any]:
    """Insert a message into ``conv`` (a :class:`_Target`'s, which counts it): ``fields``
    are its author, ``body``, ``internal`` and ``location``. Returns its row."""
    now = _now()
    msg: dict[str, Any] = {
        "id": uuid7(),
        "conversation_id": conv["id"],
        "app_id": conv["app_id"],
        "attachment_ids": [str(a.id) for a in attachments],  # in the order sent
        "created_at": now,
        "updated_at": now,
        **fields,
    }
    _INSERT_MESSAGE.execute(db, msg)
    for att in attachments:
        att.message_id = msg["id"]  # flushed at commit
    conv.update(
        message_count=conv["message_count"] + 1,
        last_message_id=msg["id"],
        last_activity_at=now,
        updated_at=now,
    )
    if not msg["internal"]:
        conv.update(last_public_message_id=msg["id"], public_activity_at=now)
    return msg


def _store_reply(
    db: Session, agent: AgentPrincipal, conv_id: UUID, data: AgentMessageCreate, body: str | None
) -> _NewMessage:
    target = _read_target(db, _REPLY_READ, {"id": conv_id})
    if target is None or target.conv["app_id"] not in agent.app_ids:
        raise NotFound("no such conversation")
    conv, (listening,) = target.conv, target.asked
    attachments = claim_in(db, conv["app_id"], None, data.attachment_ids)
    msg = _insert_message(
        db,
        conv,
        attachments,
        author_type="agent",
        author_user_id=None,
        author_agent_id=agent.agent_id,
        body=body,
        internal=data.internal,
        location=None,
    )
    answered = False
    if not data.internal:
        answered = conv["status"] == "open"
        if answered:
            conv["status"] = "pending"
        conv["user_unread_count"] += 1
        conv["agent_unread_count"] = 0
        queue_fanout_in(db, msg["id"], "user", listening=bool(listening))
    if db.get_bind().dialect.name == "postgresql":
        [(unread_total,)] = _REPLY_UPDATE.execute(db, {"conv_id": conv_id, **conv})
    else:
        _CONVERSATION_UPDATE.execute(db, {"conv_id": conv_id, **conv})
        [(unread_total,)] = _UNREAD_TOTAL.execute(db, conv)
    return _NewMessage(
        conv, msg, target.user, attachments, int(unread_total), answered, target.has_endpoint
    )


def _store_follow_up(
    db: Session,
    client: ClientPrincipal,
    conv_id: UUID,
    data: MessageCreate,
    body: str | None,
    location: dict[str, Any] | None,
) -> _NewMessage:
    target = _read_target(db, _FOLLOW_UP_READ, {"id": conv_id, "app_id": client.app_id})
    owner = (client.app_id, client.end_user_id)
    if target is None or (target.conv["app_id"], target.conv["end_user_id"]) != owner:
        # A merge moves the conversation to the user signed in as, an erasure deletes
        # it: a message sent meanwhile goes again with the SDK's new session.
        if not _LIVE_USER.execute(db, {"id": client.end_user_id, "app_id": client.app_id}):
            raise Unauthenticated(SESSION_ENDED)
        raise NotFound("no such conversation")
    conv = target.conv
    if conv["status"] == "closed":
        raise ConversationClosed("this conversation is closed; start a new one")
    attachments = claim_in(db, client.app_id, client.end_user_id, data.attachment_ids)
    msg = _insert_message(
        db,
        conv,
        attachments,
        author_type="user",
        author_user_id=client.end_user_id,
        author_agent_id=None,
        body=body,
        internal=False,
        location=location,
    )
    reopened = conv["status"] in {"pending", "solved"}
    if reopened:
        conv["status"] = "open"
    conv["agent_unread_count"] += 1
    (listening,) = target.asked
    queue_fanout_in(db, msg["id"], "agents", listening=bool(listening), first=False)
    _CONVERSATION_UPDATE.execute(db, {"conv_id": conv_id, **conv})
    return _NewMessage(conv, msg, target.user, attachments, 0, reopened, target.has_endpoint)


async def _message_events_in(
    tx: Tx,
    store: ObjectStore,
    r: _NewMessage,
    agent: AgentPrincipal | None = None,
    *,
    created: bool = False,
    answer: Answer | None = None,
) -> _MessageViews:
    """Write the events of a message :func:`_store_reply`, :func:`_store_follow_up` or
    (``created``: with its conversation) :func:`_store_feedback` stored; the views they
    carry, one of which is the request's answer. ``answer`` (``created`` only): the
    request's idempotency key, written with the events and the user's view."""
    authors = Related()
    if r.attachments:
        ordered = sorted(r.attachments, key=lambda a: (a.created_at, a.id))  # as lists show them
        authors.attachments[r.msg["id"]] = [await attachment_out(store, a) for a in ordered]
    drafts, views = _message_views(r, authors, agent, created=created)
    if answer is not None:
        assert created
        answer.produced(views.client_conv)
    await tx.run(emit_in, r.conv["app_id"], drafts, has_endpoint=r.has_endpoint, answer=answer)
    return views


def _message_views(
    r: _NewMessage, authors: Related, agent: AgentPrincipal | None = None, *, created: bool
) -> tuple[list[EventDraft], _MessageViews]:
    """The events of a stored new message and the views they carry; ``authors`` holds
    the message's attachments, if any."""
    authors.users[r.user.id] = r.user.name
    if agent is not None:
        authors.agents[agent.agent_id] = agent.name  # known from the token
    # The views read the stored values as they are: no ORM instances to build.
    conv = cast(ConversationFields, SimpleNamespace(**r.conv))
    message = cast(MessageFields, SimpleNamespace(**r.msg))
    drafts, views = message_events(
        conv,
        message,
        None if message.internal else message,
        authors,
        r.user,
        created=created,
        status_changed=r.status_changed,
    )
    if agent is not None and not message.internal:
        drafts.append(unread_changed(conv, r.unread_total))
    return drafts, views


async def reply_in(
    tx: Tx, store: ObjectStore, agent: AgentPrincipal, conv_id: UUID, data: AgentMessageCreate
) -> AgentMessageOut:
    """An agent's reply or internal note, the user's push job and the events."""
    if data.body is None and not data.attachment_ids:
        raise ValidationFailed.field("body", "a reply needs a body or attachments")
    body = clean_body(data.body, required=False)
    if not agent.app_ids:
        raise NotFound("no such conversation")
    stored = await tx.run(_store_reply, agent, conv_id, data, body)
    return (await _message_events_in(tx, store, stored, agent)).agent_msg


async def follow_up_in(
    tx: Tx, store: ObjectStore, client: ClientPrincipal, conv_id: UUID, data: MessageCreate
) -> MessageOut:
    """An end user's message in their conversation, the agents' push job and the events."""
    if data.body is None and not data.attachment_ids and data.location is None:
        raise ValidationFailed.field("body", "a message needs a body, attachments or a location")
    body = clean_body(data.body, required=False)
    location = clean_location(data.location)
    stored = await tx.run(_store_follow_up, client, conv_id, data, body, location)
    views = await _message_events_in(tx, store, stored)
    assert views.client_msg is not None  # a user's message is never internal
    return views.client_msg
