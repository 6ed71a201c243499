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
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import av
import pillow_heif
import structlog
from PIL import Image, ImageOps
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.db.models import App, Attachment, Conversation, Message
from tellback_server.domain.apps.services import parse_settings
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

pillow_heif.register_heif_opener()
# We check pixel counts ourselves before decoding; Pillow's own guard stays as a backstop.
Image.MAX_IMAGE_PIXELS = 100_000_000
MAX_PIXELS = 50_000_000
THUMB_PX = 512
GPS_TAG = 0x8825
ORIENTATION_TAG = 0x0112
PIL_FORMATS = {
    "image/jpeg": {"JPEG", "MPO"},
    "image/png": {"PNG"},
    "image/gif": {"GIF"},
    "image/webp": {"WEBP"},
    "image/heic": {"HEIF"},
    "image/heif": {"HEIF"},
}
SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    "JPEG": {"quality": 95},
    "MPO": {"quality": 95},
    "WEBP": {"quality": 95},
    "HEIF": {"quality": 95},
    "PNG": {},
    "GIF": {},
}


@dataclass
class Outcome:
    ready: bool
    reason: str | None = None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    codec: str | None = None
    thumbnail: Path | None = None
    rewritten: Path | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _save_thumbnail(image: Image.Image, target: Path) -> Path:
    thumb = image.copy()
    thumb.thumbnail((THUMB_PX, THUMB_PX))
    if thumb.mode not in {"RGB", "L"}:
        thumb = thumb.convert("RGB")
    thumb.save(target, "JPEG", quality=80)
    return target


def analyse_photo(src: Path, content_type: str, workdir: Path, keep_location: bool) -> Outcome:
    try:
        with Image.open(src) as image:
            if image.format not in PIL_FORMATS.get(content_type, set()):
                return Outcome(
                    False, f"the file is {image.format or 'unknown'}, not {content_type}"
                )
            width, height = image.size
            if width * height > MAX_PIXELS:
                return Outcome(False, f"the image is too large ({width}x{height} pixels)")
            image.load()
            exif = image.getexif()
            fmt = image.format
            oriented = ImageOps.exif_transpose(image) or image
            thumbnail = _save_thumbnail(oriented, workdir / "thumb.jpg")
            # XMP can carry the position too (exif:GPSLatitude), and any other place
            # or person it names: it goes whole with the EXIF GPS.
            located = GPS_TAG in exif or bool(image.info.get("xmp"))
            needs_rewrite = (located and not keep_location) or exif.get(ORIENTATION_TAG, 1) != 1
            rewritten = None
            if needs_rewrite and fmt is not None:
                options = dict(SAVE_OPTIONS.get(fmt, {}))
                if not keep_location:
                    exif.pop(GPS_TAG, None)
                    oriented.info.pop("xmp", None)  # (pillow-heif writes the image's own)
                    options["xmp"] = None if fmt == "HEIF" else b""
                exif[ORIENTATION_TAG] = 1
                rewritten = workdir / "rewritten"
                save_format = "JPEG" if fmt == "MPO" else fmt
                oriented.save(rewritten, save_format, exif=exif.tobytes(), **options)
            return Outcome(
                True,
                width=oriented.width,
                height=oriented.height,
                thumbnail=thumbnail,
                rewritten=rewritten,
            )
    except Image.DecompressionBombError:
        return Outcome(False, "the image is too large to decode safely")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return Outcome(False, f"the image could not be decoded ({type(exc).__name__})")


# What the muxer writes a video as: its declared type's own container.
VIDEO_FORMATS = {"video/mp4": "mp4", "video/quicktime": "mov"}


def _located(container: Any) -> bool:
    """Whether a video may carry where it was recorded: a location tag in the container
    (QuickTime's ``©xyz``, read as ``location``; Apple's ``…location.ISO6709`` key) or
    a track that is neither picture nor sound (iPhones write timed metadata tracks)."""
    tags = [*container.metadata, *(k for s in container.streams for k in s.metadata)]
    return any("location" in k.lower() or "xyz" in k.lower() for k in tags) or any(
        s.type not in {"video", "audio"} for s in container.streams
    )


def _remuxed(src: Path, target: Path, fmt: str) -> Path:
    """``src``'s picture and sound, packet for packet (nothing re-encoded), in a new
    container with none of the original's tags or other tracks."""
    with (
        av.open(str(src), metadata_errors="ignore") as source,
        av.open(str(target), "w", format=fmt) as out,
    ):
        kept = [s for s in source.streams if s.type in {"video", "audio"}]
        streams = {s.index: out.add_stream_from_template(s) for s in kept}
        for packet in source.demux(kept):
            if packet.dts is None:  # (the demuxer's flush packets)
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
    return target


def analyse_video(
    src: Path, workdir: Path, keep_location: bool = False, content_type: str = "video/mp4"
) -> Outcome:
    try:
        with av.open(str(src), metadata_errors="ignore") as container:
            if not container.streams.video:
                return Outcome(False, "the file has no video stream")
            stream = container.streams.video[0]
            duration = None
            if container.duration is not None:
                duration = container.duration / av.time_base
            elif stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            codec = stream.codec_context.name
            # Its declared size, checked before any frame is decoded (a frame is held
            # whole, then copied to RGB: an 8000x8000 picture in an 8.5 KB file took
            # half a gigabyte), against the cap photos have.
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > MAX_PIXELS:
                return Outcome(False, f"the video is too large ({width}x{height} pixels)")
            # And FFmpeg's own cap, per frame, for a frame larger than the stream declared.
            stream.codec_context.options = {"max_pixels": str(MAX_PIXELS)}
            poster = None
            for frame in container.decode(stream):
                picture = frame.to_image()  # type: ignore[no-untyped-call]
                poster = _save_thumbnail(picture, workdir / "poster.jpg")
                break
            if poster is None:
                return Outcome(False, "the video has no decodable frame")
            located = _located(container)
            width, height = stream.codec_context.width, stream.codec_context.height
        rewritten = None
        if located and not keep_location:
            fmt = VIDEO_FORMATS.get(content_type, "mp4")
            try:
                try:
                    rewritten = _remuxed(src, workdir / "rewritten", fmt)
                except (av.FFmpegError, ValueError):
                    # MP4's muxer refuses some codecs an MP4 can hold (PCM sound): QuickTime's
                    # container, the one MP4 grew from, takes them, and players read both.
                    rewritten = _remuxed(src, workdir / "rewritten", "mov")
            except (av.FFmpegError, ValueError) as exc:
                # Never served with the location in it: said so, not taken for damage.
                return Outcome(
                    False,
                    "the video records where it was made, and its streams could not be"
                    f" copied into a file without that ({type(exc).__name__})",
                )
        return Outcome(
            True,
            width=width,
            height=height,
            duration_s=round(duration, 3) if duration is not None else None,
            codec=codec,
            thumbnail=poster,
            rewritten=rewritten,
        )
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        return Outcome(False, f"the video could not be read ({type(exc).__name__})")


def analyse(
    kind: str, content_type: str, src: Path, workdir: Path, keep_location: bool, sha256: str | None
) -> Outcome:
    if sha256 is not None and _sha256(src) != sha256:
        return Outcome(False, "the file does not match its declared sha256")
    if kind == "photo":
        return analyse_photo(src, content_type, workdir, keep_location)
    if kind == "video":
        return analyse_video(src, workdir, keep_location, content_type)
    return Outcome(True)


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
        outcome = await asyncio.to_thread(
            analyse, att.kind, att.content_type, src, workdir, keep_location, att.sha256
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
