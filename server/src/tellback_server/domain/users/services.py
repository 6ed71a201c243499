"""End users as the operator sees them: lookup and erasure (GDPR "right to be forgotten")."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.db.models import (
    Attachment,
    Conversation,
    EndUser,
    IdempotencyKey,
    Installation,
    Message,
)
from tellback_server.domain.apps.services import require_app
from tellback_server.domain.attachments.services import delete_keys, stored_keys
from tellback_server.domain.identity.schemas import EndUserOut
from tellback_server.domain.identity.services import lock_end_users, user_out
from tellback_server.http.auth_cache import auth_changed
from tellback_server.http.errors import NotFound
from tellback_server.http.pagination import Page, keyset_page
from tellback_server.storage.base import ObjectStore


class EndUserService:
    def __init__(self, db: AsyncSession, store: ObjectStore) -> None:
        self.db = db
        self.store = store

    async def list(
        self, app_id: UUID, external_id: str | None, cursor: str | None, limit: int
    ) -> Page[EndUserOut]:
        await require_app(self.db, app_id)
        stmt = select(EndUser).where(EndUser.app_id == app_id, EndUser.merged_into_id.is_(None))
        if external_id is not None:
            stmt = stmt.where(EndUser.external_id == external_id)
        rows, nxt = await keyset_page(self.db, stmt, EndUser.created_at, EndUser.id, cursor, limit)
        return Page(items=[user_out(u) for u in rows], next_cursor=nxt)

    async def erase(self, app_id: UUID, user_id: UUID) -> None:
        """Delete the user, everything they wrote, their conversations and their files.

        Rows go in this transaction; stored objects are deleted by a job queued in
        the same transaction, so a crash cannot leave files without their owner row
        being gone too (the job retries until storage confirms).
        """
        user = await self.db.scalar(
            select(EndUser).where(EndUser.id == user_id, EndUser.app_id == app_id)
        )
        if user is None:
            raise NotFound("no such end user")
        merged = select(EndUser.id).where(EndUser.merged_into_id == user_id)
        ids = [user_id, *await self.db.scalars(merged)]
        # Their writes under way finish first (and are erased too); later ones are
        # refused. Without it a write and the erasure deadlocked (a 500 to one of them),
        # or a write failed its foreign key once the user was gone.
        await lock_end_users(self.db, ids)
        # A sign-in that merged an anonymous user into them while this waited: that
        # user goes too (once the user is locked, no merge into them can finish).
        meanwhile = [i for i in await self.db.scalars(merged) if i not in ids]
        if meanwhile:
            await lock_end_users(self.db, meanwhile)
            ids += meanwhile
        conversations = select(Conversation.id).where(Conversation.end_user_id.in_(ids))
        on_their_messages = select(Message.id).where(Message.conversation_id.in_(conversations))
        rows = (
            await self.db.execute(
                select(
                    Attachment.storage_key,
                    Attachment.status,
                    Attachment.method,
                    Attachment.multipart_upload_id,
                ).where(
                    Attachment.app_id == app_id,
                    or_(
                        Attachment.uploader_user_id.in_(ids),
                        Attachment.message_id.in_(on_their_messages),
                    ),
                )
            )
        ).all()
        # Every key each may have: a processing attempt that commits meanwhile may have
        # moved the row to its rewritten photo and thumbnail.
        keys = [k for row in rows for k in stored_keys(row.storage_key)]
        # A multipart upload under way keeps its parts (and takes more) until aborted.
        uploads = [
            (r.storage_key, r.multipart_upload_id)
            for r in rows
            if r.status == "pending" and r.multipart_upload_id
        ]
        await delete_keys(self.db, keys, multipart=uploads)
        if not self.store.revokes_upload_urls:
            # A single upload under way keeps its URL, which puts bytes back until it
            # expires. (Those completed, aborted or expired queued this when they did.)
            late = [r.storage_key for r in rows if r.status == "pending" and r.method == "single"]
            await delete_keys(self.db, late, after_urls_expire=True)
        # The device context the SDK reported, and the stored answers to their requests
        # (sealed, but holding what they wrote), go with them.
        await self.db.execute(
            delete(Installation).where(
                Installation.app_id == app_id,
                or_(
                    Installation.anonymous_user_id.in_(ids),
                    Installation.current_user_id.in_(ids),
                ),
            )
        )
        await self.db.execute(
            delete(IdempotencyKey).where(IdempotencyKey.scope.in_([f"user:{i}" for i in ids]))
        )
        await self.db.execute(
            delete(Attachment).where(
                Attachment.app_id == app_id,
                or_(
                    Attachment.uploader_user_id.in_(ids),
                    Attachment.message_id.in_(on_their_messages),
                ),
            )
        )
        await self.db.execute(delete(Conversation).where(Conversation.end_user_id.in_(ids)))
        await self.db.execute(delete(EndUser).where(EndUser.id.in_(ids)))
        auth_changed(self.db.sync_session)  # their sessions went with them
