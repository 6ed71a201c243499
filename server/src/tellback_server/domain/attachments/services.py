"""Uploads and attachments: plan, presign, verify on complete, hand to processing.

Flow: ``create_upload`` checks the app's limits and presigns (single PUT up
to 16 MiB, else multipart with parts of at least 8 MiB and at most 10,000
parts); the client PUTs bytes straight to storage; ``complete`` checks that
every byte arrived and that the leading bytes match the declared type, then
queues ``media.process`` in the same transaction. Every state change is
visible (``pending -> processing -> ready | rejected``, with a reason).

An upload URL is signed for an hour. Where storage cannot revoke it (an S3
presigned PUT), ``complete`` first copies a single upload to a key no URL
names (``…/sealed``) and checks and serves that copy; a job queued for when
the last URL has expired deletes whatever a late PUT left at the upload's key.
(A completed multipart upload takes no more parts: its upload id is gone.)
"""

from __future__ import annotations

import datetime as dt
import math
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tellback_server.db.engine import Database
from tellback_server.db.models import Attachment, Conversation, Message
from tellback_server.domain.apps.schemas import MIB, AppSettings, KindLimits
from tellback_server.domain.apps.services import parse_settings
from tellback_server.domain.attachments import sniff
from tellback_server.domain.attachments.schemas import (
    AttachmentConfig,
    AttachmentOut,
    KindLimitsOut,
    MultipartUpload,
    PartUrl,
    SingleUpload,
    UploadComplete,
    UploadCreate,
    UploadCreated,
    UploadedPartOut,
    UploadStatus,
)
from tellback_server.http.deps import AgentPrincipal, ClientPrincipal
from tellback_server.http.errors import (
    AppError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    UnsupportedMediaType,
    ValidationFailed,
)
from tellback_server.jobs.queue import enqueue
from tellback_server.storage.base import ObjectStore, UploadedPart

SINGLE_MAX = 16 * MIB
MIN_PART = 8 * MIB
MAX_PARTS = 10_000
UPLOAD_TTL = dt.timedelta(hours=24)
UPLOAD_URL_TTL = dt.timedelta(hours=1)
URL_EXPIRY_MARGIN = dt.timedelta(minutes=10)  # storage's clock may run behind ours
DOWNLOAD_URL_TTL = dt.timedelta(minutes=15)
PROCESS_JOB = "media.process"
DELETE_JOB = "storage.delete"
USABLE = {"processing", "ready"}
# Uploads one end user may have under way (``pending``) at once; the next is 429 with
# Retry-After, which an outbox retries. An SDK sends one item's files (at most 20 on a
# message) at a time. (A module constant, not a setting.)
MAX_PENDING_PER_USER = 20
PENDING_RETRY_AFTER_S = 60
UNCHANGED = {"file", "log"}  # kinds whose bytes processing never rewrites


KEY_NAMES = ("original", "sealed", "processed", "thumb.jpg")
KEYS_PER_JOB = 500  # one storage.delete job's batch


def sibling_key(storage_key: str, name: str) -> str:
    """The key ``name`` (one of ``KEY_NAMES``) beside ``storage_key``, in the folder an
    attachment's objects share (``apps/<app>/att/<id>/``)."""
    return f"{storage_key.rsplit('/', 1)[0]}/{name}"


def stored_keys(storage_key: str) -> list[str]:
    """Every key an attachment may have stored, beside ``storage_key``: the upload as
    sent, its sealed copy, what processing rewrote, the thumbnail. Deleting them all
    leaves nothing, whichever of them exist now or a processing attempt under way still
    writes."""
    return [sibling_key(storage_key, name) for name in KEY_NAMES]


async def delete_keys(
    db: AsyncSession,
    keys: list[str],
    *,
    multipart: Sequence[tuple[str, str]] = (),
    after_urls_expire: bool = False,
) -> None:
    """Queue the deletion of ``keys`` and of the ``(key, upload id)`` multipart uploads,
    in jobs of at most ``KEYS_PER_JOB`` each, committed with the caller's change.

    ``after_urls_expire``: not now but once every upload URL naming them has expired.
    Until then an S3 presigned PUT still takes bytes, whatever became of its upload
    (completed, aborted, expired, its end user erased). URLs are handed out only while
    an upload is ``pending``, so one hour (and a margin) from now is past the last."""
    due = _now() + UPLOAD_URL_TTL + URL_EXPIRY_MARGIN if after_urls_expire else None
    for i in range(0, max(len(keys), len(multipart)), KEYS_PER_JOB):
        batch: dict[str, Any] = {"keys": keys[i : i + KEYS_PER_JOB]}
        if uploads := multipart[i : i + KEYS_PER_JOB]:
            batch["multipart"] = [list(upload) for upload in uploads]
        await enqueue(db, DELETE_JOB, batch, max_attempts=20, run_after=due)


async def accepts_bytes(db: Database, key: str) -> bool:
    """Whether ``key`` (``apps/<app>/att/<id>/original``) is a ``pending`` upload's (the
    local store's PUT asks). A URL stays signed for an hour, but once the upload is
    completed its bytes have been checked (type, size, and then processing: the location
    removed), and bytes sent after that would go around the checks."""
    parts = key.split("/")
    try:
        att_id = UUID(parts[3]) if len(parts) == 5 and parts[2] == "att" else None
    except ValueError:
        att_id = None
    if att_id is None:
        return False
    async with db.session(write=False) as session:
        found = await session.execute(
            select(Attachment.status).where(Attachment.id == att_id, Attachment.storage_key == key)
        )
        return found.scalar() == "pending"


class UploadIncomplete(AppError):
    status_code, code = 409, "upload_incomplete"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def plan(size: int) -> tuple[str, int, int]:
    """(method, part_size, part_count) for an upload of ``size`` bytes."""
    if size <= SINGLE_MAX:
        return "single", size, 1
    part_size = max(MIN_PART, math.ceil(size / MAX_PARTS / MIB) * MIB)
    return "multipart", part_size, math.ceil(size / part_size)


def clean_filename(raw: str) -> str:
    """A display name: last path component, no control characters, NFC, at most 255 chars.

    It is shown to agents and used in download headers, never as a storage key.
    """
    name = unicodedata.normalize("NFC", raw).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip().strip(".")
    return name[:255] or "file"


def kind_limits(settings: AppSettings, kind: str) -> KindLimits:
    limits: KindLimits = getattr(settings.attachments, kind)
    return limits


def attachment_config(settings: AppSettings) -> AttachmentConfig:
    def out(kind: str) -> KindLimitsOut:
        limits = kind_limits(settings, kind)
        return KindLimitsOut(max_bytes=limits.max_bytes, content_types=list(limits.content_types))

    return AttachmentConfig(
        photo=out("photo"),
        video=out("video"),
        file=out("file"),
        log=out("log"),
        multipart_threshold_bytes=SINGLE_MAX,
    )


class AttachmentService:
    def __init__(self, db: AsyncSession, store: ObjectStore) -> None:
        self.db = db
        self.store = store

    # ----- uploads (end users) ------------------------------------------------------------

    async def _own_upload(
        self, client: ClientPrincipal, upload_id: UUID, *, lock: bool = False
    ) -> Attachment:
        stmt = select(Attachment).where(
            Attachment.id == upload_id,
            Attachment.app_id == client.app_id,
            Attachment.uploader_user_id == client.end_user_id,
        )
        if lock:  # (SQLite has no FOR UPDATE: its single writer serialises the requests)
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        att = await self.db.scalar(stmt)
        if att is None:
            raise NotFound("no such upload")
        return att

    @staticmethod
    def _to_complete(att: Attachment) -> bool:
        """Whether ``att`` is still to be completed; False if it already was (completing
        twice is harmless). Raises 404 for an upload aborted or expired."""
        if att.status in {"aborted", "expired"}:
            raise NotFound(f"this upload was {att.status}; start a new one")
        if att.status != "pending":
            return False
        if att.expires_at <= _now():
            raise NotFound("this upload has expired; start a new one")
        return True

    async def create_upload(self, client: ClientPrincipal, data: UploadCreate) -> UploadCreated:
        settings = parse_settings(client.app_settings)
        limits = kind_limits(settings, data.kind)
        content_type = data.content_type.lower().split(";", 1)[0].strip()
        if content_type not in limits.content_types:
            raise UnsupportedMediaType(
                f"{content_type} is not allowed for {data.kind}s "
                f"(allowed: {', '.join(limits.content_types)})"
            )
        if data.size > limits.max_bytes:
            raise PayloadTooLarge(
                f"a {data.kind} may be at most {limits.max_bytes} bytes; this one is {data.size}"
            )
        await self._check_pending(client)
        method, part_size, part_count = plan(data.size)
        if method == "single":
            # Presigning is offline; make sure storage is there before promising a URL.
            await self.store.ping()
        now = _now()
        att = Attachment(
            app_id=client.app_id,
            uploader_user_id=client.end_user_id,
            kind=data.kind,
            filename=clean_filename(data.filename),
            content_type=content_type,
            size=data.size,
            sha256=data.sha256.lower() if data.sha256 else None,
            storage_key="",
            method=method,
            part_size=part_size,
            part_count=part_count,
            status="pending",
            expires_at=now + UPLOAD_TTL,
        )
        self.db.add(att)
        await self.db.flush()
        att.storage_key = f"apps/{client.app_id}/att/{att.id}/original"
        if method == "multipart":
            att.multipart_upload_id = await self.store.create_multipart(
                att.storage_key, content_type
            )
        await self.db.flush()
        single, multipart = await self._urls(att, done=set())
        return UploadCreated(
            upload_id=att.id,
            expires_at=att.expires_at,
            method="single" if method == "single" else "multipart",
            single=single,
            multipart=multipart,
        )

    async def _check_pending(self, client: ClientPrincipal) -> None:
        """At most ``MAX_PENDING_PER_USER`` uploads under way per end user: each holds
        storage (a multipart upload's parts) for up to 24 h. A soft cap: two creates at
        the same moment may both pass it, by one."""
        under_way = await self.db.scalar(
            select(func.count())
            .select_from(Attachment)
            .where(
                Attachment.app_id == client.app_id,
                Attachment.uploader_user_id == client.end_user_id,
                Attachment.status == "pending",
                Attachment.expires_at > _now(),
            )
        )
        if (under_way or 0) >= MAX_PENDING_PER_USER:
            raise RateLimited(
                f"{under_way} uploads are under way (at most {MAX_PENDING_PER_USER}):"
                " complete or abort one, or try again later",
                retry_after=PENDING_RETRY_AFTER_S,
            )

    async def _urls(
        self, att: Attachment, done: set[int]
    ) -> tuple[SingleUpload | None, MultipartUpload | None]:
        if att.method == "single":
            req = await self.store.presign_put(
                att.storage_key, att.content_type, att.size, UPLOAD_URL_TTL
            )
            return SingleUpload(url=req.url, headers=req.headers), None
        assert att.multipart_upload_id is not None
        assert att.part_size is not None
        parts = [
            PartUrl(
                part_number=n,
                url=await self.store.presign_part(
                    att.storage_key,
                    att.multipart_upload_id,
                    n,
                    att.part_size,
                    self._expected_part_size(att, n),
                    UPLOAD_URL_TTL,
                ),
            )
            for n in range(1, att.part_count + 1)
            if n not in done
        ]
        return None, MultipartUpload(
            part_size=att.part_size, part_count=att.part_count, parts=parts
        )

    async def _uploaded_parts(self, att: Attachment) -> list[UploadedPart]:
        if att.method != "multipart" or att.status != "pending" or not att.multipart_upload_id:
            return []
        return await self.store.list_parts(att.storage_key, att.multipart_upload_id)

    async def _assembled(self, att: Attachment) -> bool:
        """Whether storage already holds the whole object of a multipart upload: an
        earlier ``complete`` got as far as assembling it, and its answer was lost (the
        storage or the database failed next, or the client gave up waiting). Storage
        then knows the multipart upload no more, and lists none of its parts."""
        info = await self.store.stat(att.storage_key)
        return info is not None and info.size == att.size

    async def upload_status(self, client: ClientPrincipal, upload_id: UUID) -> UploadStatus:
        att = await self._own_upload(client, upload_id)
        parts = await self._uploaded_parts(att)
        single = multipart = None
        if att.status == "pending":
            # A part of the wrong length (the local store takes any up to the part
            # size) gets a fresh URL, to be sent again: complete would refuse it.
            done = {
                p.part_number
                for p in parts
                if p.size == self._expected_part_size(att, p.part_number)
            }
            if att.method == "multipart" and not parts and await self._assembled(att):
                done = set(range(1, att.part_count + 1))  # nothing left to send: complete
            single, multipart = await self._urls(att, done=done)
        return UploadStatus(
            upload_id=att.id,
            status=att.status,  # type: ignore[arg-type]
            kind=att.kind,  # type: ignore[arg-type]
            filename=att.filename,
            content_type=att.content_type,
            size=att.size,
            method=att.method,  # type: ignore[arg-type]
            expires_at=att.expires_at,
            uploaded_parts=[UploadedPartOut(p.part_number, p.etag, p.size) for p in parts],
            reason=att.reason,
            single=single,
            multipart=multipart,
        )

    def _expected_part_size(self, att: Attachment, number: int) -> int:
        assert att.part_size is not None
        if number < att.part_count:
            return att.part_size
        return att.size - att.part_size * (att.part_count - 1)

    async def _finish_multipart(self, att: Attachment, data: UploadComplete) -> None:
        assert att.multipart_upload_id is not None
        stored = {
            p.part_number: p
            for p in await self.store.list_parts(att.storage_key, att.multipart_upload_id)
        }
        if not stored and await self._assembled(att):
            return  # (a retry: an earlier complete assembled it)
        wanted = range(1, att.part_count + 1)
        missing = [n for n in wanted if n not in stored]
        if missing:
            raise UploadIncomplete(f"parts not uploaded yet: {missing[:20]}")
        for n in wanted:
            expected = self._expected_part_size(att, n)
            if stored[n].size != expected:
                raise UploadIncomplete(f"part {n} has {stored[n].size} bytes, expected {expected}")
        if data.parts:
            given = {p.part_number: p.etag.strip('"') for p in data.parts}
            if set(given) != set(wanted) or any(given[n] != stored[n].etag for n in wanted):
                raise UploadIncomplete("the parts listed do not match the uploaded parts")
        try:
            await self.store.complete_multipart(
                att.storage_key, att.multipart_upload_id, [(n, stored[n].etag) for n in wanted]
            )
        except ValueError as exc:
            if await self._assembled(att):
                return  # assembled by a complete running at the same time
            raise UploadIncomplete(f"storage refused to assemble the parts: {exc}") from None

    async def complete(
        self, client: ClientPrincipal, upload_id: UUID, data: UploadComplete
    ) -> tuple[AttachmentOut, str | None]:
        """Verify and queue processing. Returns the attachment and, if its bytes are not
        what the type claims, the rejection reason (the caller answers 415 but the
        rejection itself is committed, so the user and agents can see it).

        Storage is checked without a lock (assembling a large upload takes a while);
        the row is then locked and its status read again before it changes. An abort
        at the same time (another process) holds that lock while it deletes the bytes,
        so either it aborted first (404, whatever storage answered meanwhile) or it
        comes after this complete and aborts the completed upload."""
        att = await self._own_upload(client, upload_id)
        if not self._to_complete(att):
            return await self.out(att), None
        seal = att.method == "single" and not self.store.revokes_upload_urls
        try:
            key, head = await self._stored_head(att, data, seal=seal)
        except Exception:
            # Bytes missing or unreadable because an abort deleted them: its answer
            # (or a complete at the same time finished, and its copy went).
            att = await self._own_upload(client, upload_id, lock=True)
            if not self._to_complete(att):
                return await self.out(att), None
            raise
        att = await self._own_upload(client, upload_id, lock=True)
        if not self._to_complete(att):
            return await self.out(att), None  # completed at the same time
        if seal:
            # From here on the copy is the attachment; the upload as sent goes now, and
            # again once its URL cannot have put anything there any more.
            await delete_keys(self.db, [att.storage_key])
            await delete_keys(self.db, [att.storage_key], after_urls_expire=True)
            att.storage_key = key
        att.completed_at = _now()
        att.multipart_upload_id = None
        if not sniff.matches(att.content_type, head):
            reason = f"the file's content is not {att.content_type}"
            att.status, att.reason = "rejected", reason
            await self.store.delete(att.storage_key)  # (one call under the lock)
            await self.db.flush()
            return await self.out(att), reason
        att.status = "processing"
        await self.db.flush()
        # Once per attachment, though two completes (a client's retry while its first
        # was still assembling a large upload) may both get this far.
        await enqueue(
            self.db,
            PROCESS_JOB,
            {"attachment_id": str(att.id)},
            max_attempts=5,
            dedupe_key=f"{PROCESS_JOB}:{att.id}",
        )
        return await self.out(att), None

    async def _stored_head(
        self, att: Attachment, data: UploadComplete, *, seal: bool
    ) -> tuple[str, bytes]:
        """Check that storage holds all of ``att``'s bytes (assembling a multipart
        upload, copying a single one to its sealed key if ``seal``); returns the key
        that is to be the attachment and its leading bytes."""
        if att.method == "multipart":
            await self._finish_multipart(att, data)
        key = sibling_key(att.storage_key, "sealed") if seal else att.storage_key
        if seal and not await self.store.copy(att.storage_key, key):
            raise UploadIncomplete("no bytes have been uploaded")
        info = await self.store.stat(key)
        if info is None:
            raise UploadIncomplete("no bytes have been uploaded")
        if info.size != att.size:
            if seal:
                await self.store.delete(key)  # the client sends the file again
            raise UploadIncomplete(f"{info.size} bytes stored, {att.size} declared")
        return key, await self.store.read_head(key, sniff.HEAD_BYTES)

    async def abort(self, client: ClientPrincipal, upload_id: UUID) -> None:
        # Locked across the deletion (a storage call or two, a few ms): a complete at
        # the same time then sees either the upload still pending with its bytes, or
        # aborted, never pending with its bytes gone.
        att = await self._own_upload(client, upload_id, lock=True)
        if att.status != "pending":
            if att.message_id is not None:
                raise ValidationFailed.field("upload_id", "this attachment is part of a message")
            await delete_keys(self.db, stored_keys(att.storage_key))
            att.status = "aborted"
            return
        if att.multipart_upload_id:
            await self.store.abort_multipart(att.storage_key, att.multipart_upload_id)
        await self.store.delete(att.storage_key)
        if att.method == "single" and not self.store.revokes_upload_urls:
            await delete_keys(self.db, stored_keys(att.storage_key), after_urls_expire=True)
        att.status = "aborted"
        att.multipart_upload_id = None

    # ----- reading ------------------------------------------------------------------------

    async def out(self, att: Attachment) -> AttachmentOut:
        return await attachment_out(self.store, att)

    async def get_for_client(self, client: ClientPrincipal, attachment_id: UUID) -> AttachmentOut:
        on_own_conversation = (
            select(Message.id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(
                Message.id == Attachment.message_id,
                Message.internal.is_(False),
                Conversation.end_user_id == client.end_user_id,
            )
            .exists()
        )
        att = await self.db.scalar(
            select(Attachment).where(
                Attachment.id == attachment_id,
                Attachment.app_id == client.app_id,
                or_(Attachment.uploader_user_id == client.end_user_id, on_own_conversation),
            )
        )
        if att is None:
            raise NotFound("no such attachment")
        return await self.out(att)

    async def get_for_agent(self, agent: AgentPrincipal, attachment_id: UUID) -> AttachmentOut:
        if not agent.app_ids:
            raise NotFound("no such attachment")
        att = await self.db.scalar(
            select(Attachment).where(
                Attachment.id == attachment_id,
                Attachment.app_id.in_(agent.app_ids),
                Attachment.message_id.is_not(None),
            )
        )
        if att is None:
            raise NotFound("no such attachment")
        return await self.out(att)

    async def for_messages(self, message_ids: Iterable[UUID]) -> dict[UUID, list[AttachmentOut]]:
        ids = set(message_ids)
        if not ids:
            return {}
        rows = await self.db.scalars(
            select(Attachment)
            .where(Attachment.message_id.in_(ids))
            .order_by(Attachment.created_at, Attachment.id)
        )
        result: dict[UUID, list[AttachmentOut]] = {}
        for att in rows:
            assert att.message_id is not None
            result.setdefault(att.message_id, []).append(await self.out(att))
        return result

    # ----- attaching to messages ----------------------------------------------------------

    async def claim(
        self, app_id: UUID, uploader_user_id: UUID | None, ids: Sequence[str]
    ) -> list[Attachment]:
        """Check that ``ids`` are the uploader's own completed, unattached uploads."""
        return await self.db.run_sync(claim_in, app_id, uploader_user_id, ids)


def claim_in(
    db: Session, app_id: UUID, uploader_user_id: UUID | None, ids: Sequence[str]
) -> list[Attachment]:
    """Check that ``ids`` are the uploader's own completed, unattached uploads."""
    if not ids:
        return []
    if uploader_user_id is None:
        raise ValidationFailed.field("attachment_ids", "agents cannot attach uploads yet")
    parsed: list[UUID] = []
    for i, raw in enumerate(ids):
        try:
            parsed.append(UUID(raw))
        except ValueError:
            raise ValidationFailed.field(f"attachment_ids[{i}]", "unknown attachment id") from None
    if len(set(parsed)) != len(parsed):
        raise ValidationFailed.field("attachment_ids", "an attachment is listed twice")
    # Locked, and read afresh once locked: two messages naming one upload at once (on
    # two processes) would otherwise both see it unattached and both take it. In id
    # order, so two claims of the same uploads wait for each other rather than deadlock.
    # (SQLite has no FOR UPDATE: its single writer serialises the claims.)
    rows = {
        a.id: a
        for a in db.scalars(
            select(Attachment)
            .where(
                Attachment.id.in_(parsed),
                Attachment.app_id == app_id,
                Attachment.uploader_user_id == uploader_user_id,
            )
            .order_by(Attachment.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }
    claimed = []
    for i, att_id in enumerate(parsed):
        att = rows.get(att_id)
        field = f"attachment_ids[{i}]"
        if att is None:
            raise ValidationFailed.field(field, "unknown attachment id")
        if att.message_id is not None:
            raise ValidationFailed.field(field, "already attached to a message")
        if att.status == "rejected":
            raise ValidationFailed.field(field, f"the attachment was rejected: {att.reason}")
        if att.status == "expired" and att.completed_at is not None:
            raise ValidationFailed.field(field, f"the upload expired: {att.reason}; send it again")
        if att.status not in USABLE:
            raise ValidationFailed.field(field, "upload not completed yet")
        claimed.append(att)
    return claimed


async def attachment_out(store: ObjectStore, att: Attachment) -> AttachmentOut:
    """The wire view of an attachment, with fresh download URLs once it may be fetched:
    a photo or video once ``ready`` (while it is ``processing`` its stored bytes are
    still the upload's own, with any location processing removes), a file or a log
    from ``processing`` on (processing only checks them)."""
    url = thumb = None
    expires = None
    if att.status == "ready" or (att.status == "processing" and att.kind in UNCHANGED):
        expires = _now() + DOWNLOAD_URL_TTL
        url = await store.presign_get(
            att.storage_key,
            DOWNLOAD_URL_TTL,
            filename=att.filename,
            content_type=att.content_type,
        )
        if att.thumbnail_key:
            thumb = await store.presign_get(
                att.thumbnail_key, DOWNLOAD_URL_TTL, filename=None, content_type="image/jpeg"
            )
    return AttachmentOut(
        id=att.id,
        kind=att.kind,  # type: ignore[arg-type]
        filename=att.filename,
        content_type=att.content_type,
        size=att.size,
        status=att.status,  # type: ignore[arg-type]
        reason=att.reason,
        width=att.width,
        height=att.height,
        duration_s=att.duration_s,
        url=url,
        thumbnail_url=thumb,
        expires_at=expires,
        created_at=att.created_at,
    )
