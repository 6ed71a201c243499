"""Conversations (feedback): create (now or queued), list, get, mark read."""

from __future__ import annotations

from typing import Literal, Unpack, overload

from tellback_sdk._core import RequestSpec, decode
from tellback_sdk._outbox_store import QueuedItem
from tellback_sdk.pagination import AsyncPager, Page, SyncPager
from tellback_sdk.resources._base import AsyncAPIResource, SyncAPIResource
from tellback_sdk.resources._bodies import (
    ConversationFields,
    body_of,
    check_conversation,
    files_of,
    list_spec,
    read_spec,
    to_page,
)
from tellback_sdk.types import Conversation, PageBody

PATH = "/v1/client/conversations"


class _SyncConversations(SyncAPIResource):
    def _create(
        self, body: str, queue: bool, fields: ConversationFields
    ) -> Conversation | QueuedItem:
        check_conversation(body)
        request, files = body_of(body, fields), files_of(fields)
        if queue:
            return self._client.outbox._store.enqueue(
                self._core.owner, "conversation", request, None, files
            )
        uploaded = [
            self._client.attachments.upload(
                f.path, kind=f.kind, content_type=f.content_type, filename=f.filename
            ).id
            for f in files
        ]
        if uploaded:
            request["attachment_ids"] = list(request.get("attachment_ids", [])) + uploaded
        return decode(self._client._call(RequestSpec.create(PATH, request)), Conversation)

    def list(self, *, limit: int | None = None) -> SyncPager[Conversation]:
        """My conversations, newest activity first, fetched page by page as you iterate."""

        def fetch(cursor: str | None) -> Page[Conversation]:
            response = self._client._call(list_spec(PATH, cursor, limit))
            return to_page(decode(response, PageBody[Conversation]))

        return SyncPager(fetch)

    def get(self, conversation_id: str) -> Conversation:
        return decode(
            self._client._call(RequestSpec("GET", f"{PATH}/{conversation_id}")), Conversation
        )

    def mark_read(self, conversation_id: str, up_to_message_id: str | None = None) -> None:
        """Mark messages read up to ``up_to_message_id`` (default: the newest), lowering
        the badge."""
        if up_to_message_id is None:
            last = self.get(conversation_id).last_message
            if last is None:
                return
            up_to_message_id = last.id
        self._client._call(read_spec(conversation_id, up_to_message_id))


class Conversations(_SyncConversations):
    @overload
    def create(
        self, body: str, *, queue: Literal[False] = False, **fields: Unpack[ConversationFields]
    ) -> Conversation: ...
    @overload
    def create(
        self, body: str, *, queue: Literal[True], **fields: Unpack[ConversationFields]
    ) -> QueuedItem: ...
    def create(
        self, body: str, *, queue: bool = False, **fields: Unpack[ConversationFields]
    ) -> Conversation | QueuedItem:
        """Send feedback now (files in ``attachments`` are uploaded first), or with
        ``queue=True`` put it in the offline outbox and return at once."""
        return self._create(body, queue, fields)


class QueueingConversations(_SyncConversations):
    """For ``MobileClient``: feedback goes through the outbox unless ``queue=False``."""

    @overload
    def create(
        self, body: str, *, queue: Literal[True] = True, **fields: Unpack[ConversationFields]
    ) -> QueuedItem: ...
    @overload
    def create(
        self, body: str, *, queue: Literal[False], **fields: Unpack[ConversationFields]
    ) -> Conversation: ...
    def create(
        self, body: str, *, queue: bool = True, **fields: Unpack[ConversationFields]
    ) -> Conversation | QueuedItem:
        return self._create(body, queue, fields)


class _AsyncConversations(AsyncAPIResource):
    async def _create(
        self, body: str, queue: bool, fields: ConversationFields
    ) -> Conversation | QueuedItem:
        check_conversation(body)
        request, files = body_of(body, fields), files_of(fields)
        if queue:
            return await self._client.outbox._enqueue(
                self._core.owner, "conversation", request, None, files
            )
        uploaded = [
            (
                await self._client.attachments.upload(
                    f.path, kind=f.kind, content_type=f.content_type, filename=f.filename
                )
            ).id
            for f in files
        ]
        if uploaded:
            request["attachment_ids"] = list(request.get("attachment_ids", [])) + uploaded
        return decode(await self._client._call(RequestSpec.create(PATH, request)), Conversation)

    def list(self, *, limit: int | None = None) -> AsyncPager[Conversation]:
        async def fetch(cursor: str | None) -> Page[Conversation]:
            response = await self._client._call(list_spec(PATH, cursor, limit))
            return to_page(decode(response, PageBody[Conversation]))

        return AsyncPager(fetch)

    async def get(self, conversation_id: str) -> Conversation:
        response = await self._client._call(RequestSpec("GET", f"{PATH}/{conversation_id}"))
        return decode(response, Conversation)

    async def mark_read(self, conversation_id: str, up_to_message_id: str | None = None) -> None:
        if up_to_message_id is None:
            last = (await self.get(conversation_id)).last_message
            if last is None:
                return
            up_to_message_id = last.id
        await self._client._call(read_spec(conversation_id, up_to_message_id))


class AsyncConversations(_AsyncConversations):
    @overload
    async def create(
        self, body: str, *, queue: Literal[False] = False, **fields: Unpack[ConversationFields]
    ) -> Conversation: ...
    @overload
    async def create(
        self, body: str, *, queue: Literal[True], **fields: Unpack[ConversationFields]
    ) -> QueuedItem: ...
    async def create(
        self, body: str, *, queue: bool = False, **fields: Unpack[ConversationFields]
    ) -> Conversation | QueuedItem:
        return await self._create(body, queue, fields)


class AsyncQueueingConversations(_AsyncConversations):
    @overload
    async def create(
        self, body: str, *, queue: Literal[True] = True, **fields: Unpack[ConversationFields]
    ) -> QueuedItem: ...
    @overload
    async def create(
        self, body: str, *, queue: Literal[False], **fields: Unpack[ConversationFields]
    ) -> Conversation: ...
    async def create(
        self, body: str, *, queue: bool = True, **fields: Unpack[ConversationFields]
    ) -> Conversation | QueuedItem:
        return await self._create(body, queue, fields)
