"""Messages in a conversation: add (now or queued behind a queued conversation), list."""

from __future__ import annotations

from typing import Literal, Unpack, overload

from tellback_sdk._core import RequestSpec, decode
from tellback_sdk._outbox_store import OutboxStore, QueuedItem
from tellback_sdk.errors import OutboxError
from tellback_sdk.pagination import AsyncPager, Page, SyncPager
from tellback_sdk.resources._base import AsyncAPIResource, SyncAPIResource
from tellback_sdk.resources._bodies import (
    MessageFields,
    body_of,
    check_message,
    conversation_ref,
    files_of,
    list_spec,
    messages_path,
    to_page,
)
from tellback_sdk.types import Message, PageBody

Target = str | QueuedItem


def _immediate_target(conversation: Target, outbox: OutboxStore) -> str:
    ref = conversation_ref(conversation, outbox)
    if ref.startswith("local:"):
        raise OutboxError("that conversation is still queued: queue the message too")
    return ref


class _SyncMessages(SyncAPIResource):
    def _create(
        self, conversation: Target, body: str | None, queue: bool, fields: MessageFields
    ) -> Message | QueuedItem:
        check_message(body, fields)
        request, files = body_of(body, fields), files_of(fields)
        if queue:
            ref = conversation_ref(conversation, self._client.outbox._store)
            return self._client.outbox._store.enqueue(
                self._core.owner, "message", request, ref, files
            )
        target = _immediate_target(conversation, self._client.outbox._store)
        uploaded = [
            self._client.attachments.upload(
                f.path, kind=f.kind, content_type=f.content_type, filename=f.filename
            ).id
            for f in files
        ]
        if uploaded:
            request["attachment_ids"] = list(request.get("attachment_ids", [])) + uploaded
        spec = RequestSpec.create(messages_path(target), request)
        return decode(self._client._call(spec), Message)

    def list(self, conversation_id: str, *, limit: int | None = None) -> SyncPager[Message]:
        """Oldest first, fetched page by page as you iterate."""

        def fetch(cursor: str | None) -> Page[Message]:
            response = self._client._call(list_spec(messages_path(conversation_id), cursor, limit))
            return to_page(decode(response, PageBody[Message]))

        return SyncPager(fetch)


class Messages(_SyncMessages):
    @overload
    def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: Literal[False] = False,
        **fields: Unpack[MessageFields],
    ) -> Message: ...
    @overload
    def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: Literal[True],
        **fields: Unpack[MessageFields],
    ) -> QueuedItem: ...
    def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: bool = False,
        **fields: Unpack[MessageFields],
    ) -> Message | QueuedItem:
        """Add a message. ``conversation`` may be a queued conversation's ``QueuedItem``
        (with ``queue=True``): the message waits for it and then uses its real id."""
        return self._create(conversation, body, queue, fields)


class QueueingMessages(_SyncMessages):
    @overload
    def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: Literal[True] = True,
        **fields: Unpack[MessageFields],
    ) -> QueuedItem: ...
    @overload
    def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: Literal[False],
        **fields: Unpack[MessageFields],
    ) -> Message: ...
    def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: bool = True,
        **fields: Unpack[MessageFields],
    ) -> Message | QueuedItem:
        return self._create(conversation, body, queue, fields)


class _AsyncMessages(AsyncAPIResource):
    async def _create(
        self, conversation: Target, body: str | None, queue: bool, fields: MessageFields
    ) -> Message | QueuedItem:
        check_message(body, fields)
        request, files = body_of(body, fields), files_of(fields)
        if queue:
            ref = conversation_ref(conversation, self._client.outbox._store)
            return await self._client.outbox._enqueue(
                self._core.owner, "message", request, ref, files
            )
        target = _immediate_target(conversation, self._client.outbox._store)
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
        spec = RequestSpec.create(messages_path(target), request)
        return decode(await self._client._call(spec), Message)

    def list(self, conversation_id: str, *, limit: int | None = None) -> AsyncPager[Message]:
        async def fetch(cursor: str | None) -> Page[Message]:
            spec = list_spec(messages_path(conversation_id), cursor, limit)
            return to_page(decode(await self._client._call(spec), PageBody[Message]))

        return AsyncPager(fetch)


class AsyncMessages(_AsyncMessages):
    @overload
    async def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: Literal[False] = False,
        **fields: Unpack[MessageFields],
    ) -> Message: ...
    @overload
    async def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: Literal[True],
        **fields: Unpack[MessageFields],
    ) -> QueuedItem: ...
    async def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: bool = False,
        **fields: Unpack[MessageFields],
    ) -> Message | QueuedItem:
        return await self._create(conversation, body, queue, fields)


class AsyncQueueingMessages(_AsyncMessages):
    @overload
    async def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: Literal[True] = True,
        **fields: Unpack[MessageFields],
    ) -> QueuedItem: ...
    @overload
    async def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: Literal[False],
        **fields: Unpack[MessageFields],
    ) -> Message: ...
    async def create(
        self,
        conversation: Target,
        body: str | None = None,
        *,
        queue: bool = True,
        **fields: Unpack[MessageFields],
    ) -> Message | QueuedItem:
        return await self._create(conversation, body, queue, fields)
