"""Background processing of completed uploads (job kind ``media.process``).

Photos (Pillow, HEIC/HEIF through pillow-heif): the format must be the
declared one, the pixel count is capped before any decoding (decompression
bombs), the image must decode fully (truncated files fail), EXIF orientation
is applied and the location removed (EXIF GPS, and XMP, which can hold it too)
unless the app keeps photo locations (the photo is then re-encoded and stored
beside the upload, which is deleted once the row points at it), and a 512 px
JPEG thumbnail is stored beside it. Videos (PyAV, whose wheels carry FFmpeg):
duration, dimensions and codec are read, the pixel count is capped as a photo's
is before any frame is decoded, and a poster frame is stored as the thumbnail;
one that may carry where it was recorded (a location tag, a timed metadata
track) is remuxed, packet for packet, into a container with its
picture and sound alone, unless the app keeps locations. Anything that fails
these checks becomes ``rejected`` with a reason — nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any
from uuid import UUID

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.db.models import App, Attachment, Conversation, Message
from tellback_server.domain.apps.services import parse_settings
from tellback_server.domain.attachments.analysis import (
    MAX_PIXELS,
    NEEDS_MEMORY,
    Outcome,
    analyse,
    analyse_photo,
    analyse_video,
    outcome_from_json,
)
from tellback_server.domain.attachments.services import (
    DELETE_JOB,
    delete_keys,
    sibling_key,
    stored_keys,
)
from tellback_server.domain.events.records import EventDraft, emit
from tellback_server.jobs.registry import JobContext, JobRegistry, PermanentFailure
from tellback_server.state import AppState
from tellback_server.storage.base import StorageError

log = structlog.get_logger("tellback.media")

__all__ = [
    "MAX_PIXELS",
    "NEEDS_MEMORY",
    "Outcome",
    "analyse",
    "analyse_photo",
    "analyse_video",
    "register",
]

# Each file is analysed in a child process of its own (a new interpreter that imports
# Pillow, pillow-heif and PyAV: about 0.2 s), bounded, and killed if it outlasts its
# time; its memory goes back to the system with it. (A thread could not be stopped: a
# timed-out decode ran on, and again on every retry, and its memory stayed.)
ANALYSIS_MEMORY_BYTES = 1536 * 1024 * 1024  # the child's address space (RLIMIT_AS)
ANALYSIS_CPU_S = 120  # its CPU time (RLIMIT_CPU)
ANALYSIS_TIMEOUT_S = 150.0  # its wall time, then it is killed
ANALYSIS_CONCURRENCY = 2  # children at once per process; other media jobs wait their turn
NEEDS_TIME = "the file needs more time than processing allows"
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


async def run_analysis(
    kind: str, content_type: str, src: Path, workdir: Path, keep_location: bool, sha256: str | None
) -> Outcome:
    """``analyse`` in a child process bounded in memory, CPU time and wall time, at most
    ``ANALYSIS_CONCURRENCY`` at once. A file that exceeds a bound is rejected for good
    (retrying it would only exceed it again); a child that dies otherwise raises, and
    the job is retried."""
    loop = asyncio.get_running_loop()
    slots = _SLOTS.get(loop)
    if slots is None:
        slots = _SLOTS[loop] = asyncio.Semaphore(ANALYSIS_CONCURRENCY)
    job = {
        "kind": kind,
        "content_type": content_type,
        "src": str(src),
        "workdir": str(workdir),
        "keep_location": keep_location,
        "sha256": sha256,
        "memory_bytes": ANALYSIS_MEMORY_BYTES,
        "cpu_s": ANALYSIS_CPU_S,
    }
    errors = workdir / "analysis.stderr"
    async with slots:
        with errors.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # (not the working directory on its path)
                "-m",
                "tellback_server.domain.attachments.analysis",
                json.dumps(job),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        try:
            try:
                out, _ = await asyncio.wait_for(process.communicate(), ANALYSIS_TIMEOUT_S)
            except TimeoutError:
                return Outcome(False, NEEDS_TIME)
        finally:
            if process.returncode is None:  # timed out, or the job was cancelled
                process.kill()
                await asyncio.shield(process.wait())
    if process.returncode == 0 and out.strip():
        return outcome_from_json(out.decode().strip().splitlines()[-1])
    if process.returncode in {-signal.SIGXCPU, -signal.SIGKILL}:
        return Outcome(False, NEEDS_TIME)
    detail = errors.read_bytes()[-1000:].decode(errors="replace")
    raise RuntimeError(f"media analysis ended with exit code {process.returncode}: {detail}")


async def process_attachment(ctx: JobContext, payload: dict[str, Any]) -> None:
    state = ctx.state
    attachment_id = UUID(str(payload["attachment_id"]))
    async with state.db.session(write=False) as db:
        row = (
            await db.execute(
                select(Attachment, App.settings)
                .join(App, App.id == Attachment.app_id)
                .where(Attachment.id == attachment_id)
            )
        ).first()
    if row is None:
        raise PermanentFailure("attachment no longer exists")
    att, app_settings = row
    if att.status != "processing":
        return  # already handled by an earlier attempt
    keep_location = parse_settings(app_settings).keep_photo_location
    store = state.store
    with tempfile.TemporaryDirectory(prefix="tellback-media-") as tmp:
        workdir = Path(tmp)
        src = workdir / "original"
        try:
            await store.download(att.storage_key, src)
        except FileNotFoundError:
            raise PermanentFailure("the upload's bytes are gone from storage") from None
        outcome = await run_analysis(
            att.kind, att.content_type, src, workdir, keep_location, att.sha256
        )
        written: list[str] = []  # what this attempt stored
        if outcome.ready and outcome.rewritten is not None:
            # A key of its own: the upload stays as sent until the row points here, so
            # an attempt that fails after this checks the same bytes (and sha256) again.
            written.append(sibling_key(att.storage_key, "processed"))
            await store.upload_file(written[-1], outcome.rewritten, att.content_type)
        thumbnail_key = None
        if outcome.ready and outcome.thumbnail is not None:
            thumbnail_key = sibling_key(att.storage_key, "thumb.jpg")
            written.append(thumbnail_key)
            await store.upload_file(thumbnail_key, outcome.thumbnail, "image/jpeg")
        size = outcome.rewritten.stat().st_size if outcome.rewritten is not None else None
    values: dict[str, Any] = {
        "status": "ready" if outcome.ready else "rejected",
        "reason": outcome.reason,
        "width": outcome.width,
        "height": outcome.height,
        "duration_s": outcome.duration_s,
        "codec": outcome.codec,
        "thumbnail_key": thumbnail_key,
    }
    if size is not None:
        values["size"] = size
        values["storage_key"] = written[0]
    # What no row will point at once this commits: the upload as sent, when it was
    # rewritten or rejected (deleted by a job queued with the change, so a crash cannot
    # leave it behind), or, when the attachment went meanwhile (its end user erased),
    # what this attempt stored.
    unneeded = [att.storage_key] if size is not None or not outcome.ready else []
    async with state.db.session(write=True) as db:
        done = await db.execute(
            update(Attachment)
            .where(Attachment.id == att.id, Attachment.status == "processing")
            .values(**values)
            .returning(Attachment.message_id)
        )
        row = done.first()
        if row is None:
            # Erased, aborted or rejected meanwhile: nothing points at what this attempt
            # stored. Unless another attempt made it ready first: its keys are these too.
            now_status = await db.scalar(select(Attachment.status).where(Attachment.id == att.id))
            unneeded = [] if now_status == "ready" else written
        if unneeded:
            await delete_keys(db, unneeded)
        if row is not None and row.message_id is not None:
            await _announce(db, att, row.message_id, values["status"], outcome.reason)
    log.info(
        "media.processed",
        attachment_id=str(att.id),
        kind=att.kind,
        ready=outcome.ready,
        reason=outcome.reason,
    )


GAVE_UP = "the server could not process this file"


async def processing_failed(ctx: JobContext, payload: dict[str, Any], reason: str) -> None:
    """The media job failed for good (a file that crashes or outlasts processing, its
    bytes gone): the attachment is ``rejected`` with a reason, as a file processing
    refuses is, instead of staying ``processing`` for good. The details stay in the
    log; a storage outage never gets here (it is waited out)."""
    attachment_id = UUID(str(payload["attachment_id"]))
    async with ctx.state.db.session(write=True) as db:
        done = await db.execute(
            update(Attachment)
            .where(Attachment.id == attachment_id, Attachment.status == "processing")
            .values(status="rejected", reason=GAVE_UP)
            .returning(Attachment)
        )
        att = done.scalar()
        if att is None:
            return  # handled meanwhile, or gone
        await delete_keys(db, stored_keys(att.storage_key))
        if att.message_id is not None:
            await _announce(db, att, att.message_id, "rejected", GAVE_UP)
    log.warning("media.gave_up", attachment_id=str(attachment_id), reason=reason[:500])


async def _announce(
    db: AsyncSession, att: Attachment, message_id: UUID, status: str, reason: str | None
) -> None:
    """``attachment.updated`` to open screens: a processed photo or video can now show.

    It carries no URLs (they expire; events are replayed for days): clients fetch the
    attachment, or the message, again.
    """
    found = (
        await db.execute(
            select(Message.conversation_id, Message.internal, Conversation.end_user_id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(Message.id == message_id)
        )
    ).first()
    if found is None:
        return
    data = {
        "attachment_id": str(att.id),
        "message_id": str(message_id),
        "conversation_id": str(found.conversation_id),
        "status": status,
        "reason": reason,
    }
    client_data = None if found.internal else data
    draft = EventDraft(
        "attachment.updated", found.conversation_id, found.end_user_id, data, client_data
    )
    await emit(db, att.app_id, [draft])


async def delete_objects(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Delete ``keys``, and abort the ``multipart`` uploads (``[key, upload_id]``) still
    under way: their parts, and the URLs that would take more."""
    for key, upload_id in payload.get("multipart", []):
        await ctx.state.store.abort_multipart(str(key), str(upload_id))
    for key in payload.get("keys", []):
        await ctx.state.store.delete(str(key))


EXPIRY_BATCH = 500  # rows per transaction of the expiry
# How long a completed upload waits for the message that attaches it. An SDK's outbox
# completes its uploads and sends the message in one flush, and keeps that message
# through every failure it retries (offline, 429, 5xx) and past a dead letter the user
# retries: a week outlasts any such wait by days, and bounds what uploads never
# attached keep of storage. (A module constant, not a setting.)
UNATTACHED_TTL = dt.timedelta(days=7)
NEVER_ATTACHED = "never attached to a message within 7 days of its upload"


async def _expire_pending(state: AppState, now: dt.datetime) -> int:
    """Abort at most ``EXPIRY_BATCH`` uploads never completed within their 24 h."""
    async with state.db.session(write=False) as db:
        rows = list(
            await db.scalars(
                select(Attachment)
                .where(Attachment.status == "pending", Attachment.expires_at <= now)
                .limit(EXPIRY_BATCH)
            )
        )
    for att in rows:
        if att.multipart_upload_id:
            await state.store.abort_multipart(att.storage_key, att.multipart_upload_id)
        await state.store.delete(att.storage_key)
        async with state.db.session(write=True) as db:
            expired = await db.execute(
                update(Attachment)
                .where(Attachment.id == att.id, Attachment.status == "pending")
                .values(status="expired", reason="never completed", multipart_upload_id=None)
                .returning(Attachment.method)
            )
            # Its URL may still be signed for a while (it was handed out until now).
            late = expired.scalar() == "single" and not state.store.revokes_upload_urls
            if late:
                await delete_keys(db, stored_keys(att.storage_key), after_urls_expire=True)
    return len(rows)


async def _expire_unattached(state: AppState, now: dt.datetime) -> int:
    """Expire at most ``EXPIRY_BATCH`` completed uploads no message took within
    ``UNATTACHED_TTL``, their stored objects deleted by jobs committed with the change.
    A message claiming one at the same moment locks it first: whichever commits first
    wins, and the other sees it attached, or expired."""
    due = (
        select(Attachment.id)
        .where(
            Attachment.status.in_(("processing", "ready")),
            Attachment.message_id.is_(None),
            Attachment.completed_at <= now - UNATTACHED_TTL,
        )
        .limit(EXPIRY_BATCH)
    )
    async with state.db.session(write=True) as db:
        ids = list(await db.scalars(due))
        if not ids:
            return 0
        done = await db.execute(
            update(Attachment)
            .where(
                Attachment.id.in_(ids),
                Attachment.status.in_(("processing", "ready")),
                Attachment.message_id.is_(None),
            )
            .values(status="expired", reason=NEVER_ATTACHED)
            .returning(Attachment.storage_key)
        )
        keys = [key for (storage_key,) in done for key in stored_keys(storage_key)]
        if keys:
            await delete_keys(db, keys)
    return len(ids)


async def expire_abandoned_uploads(state: AppState) -> int:
    """Abort uploads never completed within their 24 h, and expire completed ones never
    attached within ``UNATTACHED_TTL``, freeing their storage. Batch after batch, each
    its own small transactions, until a pass finds none left of what was due when it
    began: one batch per run would fall behind uploads made faster than it."""
    now = dt.datetime.now(dt.UTC)
    pending = unattached = 0
    while True:
        found = await _expire_pending(state, now)
        pending += found
        more = await _expire_unattached(state, now)
        unattached += more
        if found < EXPIRY_BATCH and more < EXPIRY_BATCH:
            break
    if pending or unattached:
        log.info("media.uploads_expired", count=pending, unattached=unattached)
    return pending + unattached


def register(registry: JobRegistry) -> None:
    registry.register(
        "media.process",
        process_attachment,
        max_attempts=5,
        timeout_s=300,
        waits_out=(StorageError,),
        on_failed=processing_failed,
    )
    registry.register(DELETE_JOB, delete_objects, max_attempts=20, waits_out=(StorageError,))
    registry.periodic("uploads.expire", 600, expire_abandoned_uploads)
