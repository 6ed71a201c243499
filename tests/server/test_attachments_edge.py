"""Attachments: limits, hostile files, broken uploads, other people's uploads, cleanup.

API.md "Attachments" and "Errors". Tests where storage matters run on local disk
and on a real S3 server (`storage_api`); tests of pure API rules run on local
disk only (`local_api`). Both run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import struct
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import av
import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select, update

from tellback_server.asgi import build_state, create_app
from tellback_server.db.models import Attachment, Event, IdempotencyKey, Installation, Job
from tellback_server.domain.attachments.media import analyse_video, expire_abandoned_uploads
from tellback_server.plugins import build_registry
from tellback_server.settings import S3Settings, Settings
from tellback_server.storage.local import LocalStore, SignedOp
from tests.server.conftest import (
    Api,
    AppInfo,
    _admin_token,
    identity_token,
    lifespan,
    make_settings,
    s3_settings,
)
from tests.server.test_attachments_flow import get, jpeg_with_gps, put, run_jobs, start_upload

MIB = 1024 * 1024
PROBLEM_JSON = "application/problem+json"
IMAGE_TYPES = ["image/jpeg", "image/png", "image/heic", "image/heif", "image/webp", "image/gif"]
VIDEO_TYPES = ["video/mp4", "video/quicktime"]
FILE_TYPES = ["text/plain", "application/json", "application/zip", "application/pdf"]
# Just over the single-PUT threshold: two 8 MiB parts and a 1-byte last part.
MULTIPART_SIZE = 16 * MIB + 1


# ----- fixtures ----------------------------------------------------------------------------


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Api]:
    """The app in-process with the built-in job kinds (as `storage_api` builds it)."""
    state = build_state(settings)
    app = create_app(settings, registry=build_registry(), state=state)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url=settings.base_url()) as client,
    ):
        yield Api(http=client, state=state, admin_token=await _admin_token(state))


@pytest.fixture
async def local_api(database_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    """Local-disk storage only: for rules that do not depend on the storage backend."""
    async with serve(make_settings(database_url, tmp_path / "data", port=8080)) as api:
        yield api


# ----- helpers -----------------------------------------------------------------------------


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["code"] == code, body
    return body


async def complete(
    api: Api, user: dict[str, str], upload_id: str, parts: list[dict[str, Any]] | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"parts": parts} if parts is not None else {}
    return await api.http.post(f"/v1/client/uploads/{upload_id}/complete", json=body, headers=user)


async def attachment(api: Api, headers: dict[str, str], att_id: str) -> httpx.Response:
    return await api.http.get(f"/v1/client/attachments/{att_id}", headers=headers)


async def upload_status(api: Api, headers: dict[str, str], upload_id: str) -> httpx.Response:
    return await api.http.get(f"/v1/client/uploads/{upload_id}", headers=headers)


async def uploaded(
    api: Api,
    user: dict[str, str],
    data: bytes,
    *,
    filename: str = "notes.txt",
    content_type: str = "text/plain",
    kind: str = "file",
    **extra: Any,
) -> dict[str, Any]:
    """Start a single-PUT upload and send its bytes (not completed)."""
    up = await start_upload(
        api,
        user,
        filename=filename,
        content_type=content_type,
        size=len(data),
        kind=kind,
        **extra,
    )
    assert up["method"] == "single"
    r = await put(api, up["single"]["url"], data, up["single"]["headers"])
    assert r.status_code == 200, r.text
    return up


async def processed(
    api: Api,
    user: dict[str, str],
    data: bytes,
    *,
    filename: str = "notes.txt",
    content_type: str = "text/plain",
    kind: str = "file",
    **extra: Any,
) -> dict[str, Any]:
    """Upload, complete and process; returns the attachment as its uploader sees it."""
    up = await uploaded(
        api, user, data, filename=filename, content_type=content_type, kind=kind, **extra
    )
    r = await complete(api, user, up["upload_id"])
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "processing"
    await run_jobs(api)
    r = await attachment(api, user, up["upload_id"])
    assert r.status_code == 200, r.text
    att: dict[str, Any] = r.json()
    return att


async def db_row(api: Api, att_id: str) -> Attachment:
    async with api.state.db.session(write=False) as db:
        row = await db.get(Attachment, uuid.UUID(att_id))
    assert row is not None
    return row


async def attachment_count(api: Api) -> int:
    async with api.state.db.session(write=False) as db:
        n = await db.scalar(select(func.count()).select_from(Attachment))
    return int(n or 0)


def original_key(app: AppInfo, att_id: str) -> str:
    return f"apps/{app.id}/att/{att_id}/original"


def kept_key(api: Api, app: AppInfo, att_id: str) -> str:
    """Where a completed upload's bytes, as sent, are kept: at the key its URL wrote to
    on local disk, which refuses later PUTs; on S3, whose URL cannot be revoked, at a
    copy made at `complete`."""
    if api.state.store.revokes_upload_urls:
        return original_key(app, att_id)
    return f"apps/{app.id}/att/{att_id}/sealed"


def thumb_key(app: AppInfo, att_id: str) -> str:
    return f"apps/{app.id}/att/{att_id}/thumb.jpg"


def processed_key(app: AppInfo, att_id: str) -> str:
    """Where a photo processing rewrote (its location removed) is stored."""
    return f"apps/{app.id}/att/{att_id}/processed"


def png(width: int = 40, height: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 240)).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(side: int = 10_000) -> bytes:
    """A valid side x side single-colour PNG (1-bit greyscale) of a few kilobytes."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed black pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tiny_mp4(
    frames: int = 10, width: int = 64, height: int = 48, fps: int = 10, where: str | None = None
) -> bytes:
    """A real MP4; ``where`` (ISO 6709) recorded in it as phones do."""
    buf = io.BytesIO()
    options = {"movflags": "use_metadata_tags"} if where else {}
    with av.open(buf, "w", format="mp4", options=options) as container:
        if where:
            container.metadata["location"] = where
            container.metadata["com.apple.quicktime.location.ISO6709"] = where
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = Image.new("RGB", (width, height), (i * 25 % 256, 90, 200))
            frame = av.VideoFrame.from_image(image)  # type: ignore[no-untyped-call]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def multipart_blob(size: int = MULTIPART_SIZE) -> bytes:
    return b"PK\x03\x04" + os.urandom(size - 4)


def chunks_of(blob: bytes, part_size: int, part_count: int) -> dict[int, bytes]:
    return {n: blob[(n - 1) * part_size : n * part_size] for n in range(1, part_count + 1)}


async def start_multipart(api: Api, user: dict[str, str], blob: bytes) -> dict[str, Any]:
    up = await start_upload(
        api, user, filename="logs.zip", content_type="application/zip", size=len(blob), kind="file"
    )
    assert up["method"] == "multipart"
    assert [p["part_number"] for p in up["multipart"]["parts"]] == [1, 2, 3]
    return up


async def put_part(api: Api, up: dict[str, Any], number: int, data: bytes) -> str:
    url = next(p["url"] for p in up["multipart"]["parts"] if p["part_number"] == number)
    r = await put(api, url, data)
    assert r.status_code == 200, r.text
    etag: str = r.headers["etag"].strip('"')
    return etag


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def local_store(api: Api) -> LocalStore:
    store = api.state.store
    assert isinstance(store, LocalStore)
    return store


# ----- limits ------------------------------------------------------------------------------


async def test_declared_size_over_the_kind_limit_is_413(local_api: Api) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    body = {"filename": "a.jpg", "content_type": "image/jpeg", "kind": "photo"}
    r = await api.http.post("/v1/client/uploads", json={**body, "size": 20 * MIB}, headers=user)
    assert r.status_code == 201, r.text  # exactly the default photo limit is fine
    r = await api.http.post("/v1/client/uploads", json={**body, "size": 20 * MIB + 1}, headers=user)
    problem(r, 413, "payload_too_large")
    r = await api.http.post(
        "/v1/client/uploads",
        json={"filename": "a.txt", "content_type": "text/plain", "kind": "log",
              "size": 25 * MIB + 1},
        headers=user,
    )  # fmt: skip
    problem(r, 413, "payload_too_large")
    for size in (5 * 1024 * MIB + 1, 80 * 1024 * MIB, 2**62):  # past any app's limit too
        r = await api.http.post("/v1/client/uploads", json={**body, "size": size}, headers=user)
        problem(r, 413, "payload_too_large")  # (a 422 with msgspec's wording until now)
    assert await attachment_count(api) == 1


@pytest.mark.parametrize(
    ("kind", "content_type"),
    [
        ("photo", "video/mp4"),
        ("video", "image/jpeg"),
        ("file", "application/x-msdownload"),
        ("log", "image/png"),
        ("photo", "image/svg+xml"),
    ],
)
async def test_content_type_not_allowed_for_the_kind_is_415(
    local_api: Api, kind: str, content_type: str
) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    r = await api.http.post(
        "/v1/client/uploads",
        json={"filename": "x", "content_type": content_type, "size": 100, "kind": kind},
        headers=user,
    )
    problem(r, 415, "unsupported_media_type")
    assert await attachment_count(api) == 0


async def test_content_type_is_compared_case_insensitively_without_parameters(
    local_api: Api,
) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    up = await start_upload(
        api, user, filename="a.txt", content_type="Text/Plain; charset=utf-8", size=5, kind="log"
    )
    assert up["single"]["headers"]["Content-Type"] == "text/plain"


async def test_app_attachment_settings_change_what_is_accepted(local_api: Api) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)

    async def try_upload(kind: str, content_type: str, size: int) -> httpx.Response:
        return await api.http.post(
            "/v1/client/uploads",
            json={"filename": "f", "content_type": content_type, "size": size, "kind": kind},
            headers=user,
        )

    # defaults: JPEG photos are fine, files stop at 25 MiB
    assert (await try_upload("photo", "image/jpeg", 1000)).status_code == 201
    problem(await try_upload("file", "application/pdf", 30 * MIB), 413, "payload_too_large")

    r = await api.http.patch(
        f"/v1/admin/apps/{app.id}",
        json={
            "settings": {
                "attachments": {
                    "photo": {"max_bytes": 1000, "content_types": ["image/png"]},
                    "file": {"max_bytes": 40 * MIB, "content_types": ["application/pdf"]},
                }
            }
        },
        headers=api.admin,
    )
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["attachments"]["photo"] == {
        "max_bytes": 1000,
        "content_types": ["image/png"],
    }

    # the same (already open) session now gets the new limits
    problem(await try_upload("photo", "image/jpeg", 1000), 415, "unsupported_media_type")
    problem(await try_upload("photo", "image/png", 1001), 413, "payload_too_large")
    assert (await try_upload("photo", "image/png", 1000)).status_code == 201
    assert (await try_upload("file", "application/pdf", 30 * MIB)).status_code == 201
    problem(await try_upload("file", "text/plain", 10), 415, "unsupported_media_type")
    problem(await try_upload("file", "application/pdf", 40 * MIB + 1), 413, "payload_too_large")
    # kinds not named keep their defaults
    assert (await try_upload("video", "video/quicktime", 500 * MIB)).status_code == 201
    problem(await try_upload("video", "video/mp4", 512 * MIB + 1), 413, "payload_too_large")


async def test_client_config_reflects_attachment_limits(local_api: Api) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    r = await api.http.get("/v1/client/config", headers=user)
    assert r.status_code == 200, r.text
    config = r.json()["attachments"]
    assert config == {
        "photo": {"max_bytes": 20 * MIB, "content_types": IMAGE_TYPES},
        "video": {"max_bytes": 512 * MIB, "content_types": VIDEO_TYPES},
        "file": {"max_bytes": 25 * MIB, "content_types": FILE_TYPES},
        "log": {"max_bytes": 25 * MIB, "content_types": FILE_TYPES},
        "multipart_threshold_bytes": 16 * MIB,
    }

    r = await api.http.patch(
        f"/v1/admin/apps/{app.id}",
        json={
            "settings": {
                "attachments": {
                    "video": {"max_bytes": 64 * MIB, "content_types": ["video/mp4"]},
                    "log": {"max_bytes": 123, "content_types": ["text/plain"]},
                }
            }
        },
        headers=api.admin,
    )
    assert r.status_code == 200, r.text
    config = (await api.http.get("/v1/client/config", headers=user)).json()["attachments"]
    assert config["video"] == {"max_bytes": 64 * MIB, "content_types": ["video/mp4"]}
    assert config["log"] == {"max_bytes": 123, "content_types": ["text/plain"]}
    assert config["photo"] == {"max_bytes": 20 * MIB, "content_types": IMAGE_TYPES}
    assert config["file"] == {"max_bytes": 25 * MIB, "content_types": FILE_TYPES}
    # ... and what the config says is what the server enforces
    r = await api.http.post(
        "/v1/client/uploads",
        json={"filename": "l.txt", "content_type": "text/plain", "size": 124, "kind": "log"},
        headers=user,
    )
    problem(r, 413, "payload_too_large")


async def test_zero_byte_upload_is_refused_at_create(local_api: Api) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    r = await api.http.post(
        "/v1/client/uploads",
        json={"filename": "empty.txt", "content_type": "text/plain", "size": 0, "kind": "file"},
        headers=user,
    )
    body = problem(r, 422, "validation_failed")
    assert any(e["field"] == "size" for e in body["errors"]), body
    assert await attachment_count(api) == 0


# ----- hostile and broken files ------------------------------------------------------------


async def test_decompression_bomb_png_is_rejected(local_api: Api) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    bomb = png_bomb()
    assert len(bomb) < 100_000  # 100 megapixels in a tiny file
    att = await processed(
        api, user, bomb, filename="bomb.png", content_type="image/png", kind="photo"
    )
    assert att["status"] == "rejected", att
    assert "too large" in att["reason"], att
    assert att["url"] is None
    assert att["thumbnail_url"] is None
    assert att["width"] is None
    assert await api.state.store.stat(original_key(app, att["id"])) is None


async def test_truncated_jpeg_is_rejected(local_api: Api) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    photo = jpeg_with_gps(600, 400)
    truncated = photo[: len(photo) // 2]
    att = await processed(
        api, user, truncated, filename="cut.jpg", content_type="image/jpeg", kind="photo"
    )
    assert att["status"] == "rejected", att
    assert att["reason"], att
    assert att["url"] is None
    assert await api.state.store.stat(original_key(app, att["id"])) is None


async def test_mp4_with_garbage_after_ftyp_is_rejected(local_api: Api) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    ftyp = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    garbage = bytes((i * 131 + 7) % 251 for i in range(4000))
    att = await processed(
        api, user, ftyp + garbage, filename="clip.mp4", content_type="video/mp4", kind="video"
    )
    assert att["status"] == "rejected", att
    assert att["reason"], att
    assert att["url"] is None
    assert att["duration_s"] is None
    assert await api.state.store.stat(original_key(app, att["id"])) is None


async def test_real_small_mp4_becomes_ready_with_poster(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    video = tiny_mp4()
    att = await processed(
        api, user, video, filename="clip.mp4", content_type="video/mp4", kind="video"
    )
    assert att["status"] == "ready", att
    assert att["reason"] is None
    assert (att["width"], att["height"]) == (64, 48)
    assert att["duration_s"] is not None
    assert 0.5 <= att["duration_s"] <= 1.5, att  # 10 frames at 10 fps
    assert att["size"] == len(video)
    assert att["thumbnail_url"]
    r = await get(api, att["thumbnail_url"])
    assert r.status_code == 200
    poster = Image.open(io.BytesIO(r.content))
    assert poster.format == "JPEG"
    assert poster.size == (64, 48)
    original = await get(api, att["url"])
    assert original.status_code == 200
    assert original.content == video


async def test_where_a_video_was_recorded_is_removed(storage_api: Api) -> None:
    """A video tagged with where it was recorded is remuxed, packet for packet, without
    its tags (the upload as sent is deleted); with the app keeping locations, or
    without a location, it is served as sent. (The file was served as sent, location
    and all, while the docs said container metadata was never exposed.)"""
    api = storage_api
    here = "+52.5200+013.4050+034.000/"
    for keep in (False, True):
        app = await api.create_app(keep_photo_location=keep)
        user = await api.user_headers(app)
        video = tiny_mp4(where=here)
        att = await processed(
            api, user, video, filename="clip.mp4", content_type="video/mp4", kind="video"
        )
        assert att["status"] == "ready", att
        served = (await get(api, att["url"])).content
        assert (here.encode()[:9] in served) is keep
        with av.open(io.BytesIO(served), "r") as container:
            assert [s.type for s in container.streams] == ["video"]
            assert len(list(container.decode(video=0))) == 10
        assert (att["size"] == len(video)) is keep
        assert att["size"] == len(served)
        await run_jobs(api)
        row = await db_row(api, att["id"])  # (on S3 the upload as sent is a copy: sealed)
        served_as_sent = row.storage_key.rsplit("/", 1)[1] in {"original", "sealed"}
        assert served_as_sent is keep
        prefix = original_key(app, att["id"]).rsplit("/", 1)[0]
        for name in ("original", "sealed"):
            stored = await api.state.store.stat(f"{prefix}/{name}") is not None
            assert stored is (keep and row.storage_key == f"{prefix}/{name}")


def test_a_located_video_whose_sound_mp4_cannot_take_is_remuxed_all_the_same(
    tmp_path: Path,
) -> None:
    """PCM sound in an ISO file: MP4's muxer refuses to copy it, QuickTime's takes it. A
    video that plays was rejected when it carried a location (the remux failed)."""
    buf = io.BytesIO()
    options = {"movflags": "use_metadata_tags", "brand": "isom"}
    with av.open(buf, "w", format="mov", options=options) as container:
        container.metadata["location"] = "+52.5200+013.4050/"
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("pcm_alaw", rate=8000)
        for i in range(10):
            image = Image.new("RGB", (64, 48), (i * 8, 0, 0))
            for packet in video.encode(av.VideoFrame.from_image(image)):  # type: ignore[no-untyped-call]
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        ctx = sound.codec_context
        for k in range(5):
            frame = av.AudioFrame(format=ctx.format.name, layout=ctx.layout.name, samples=800)
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))
            frame.sample_rate, frame.pts = 8000, k * 800
            for packet in sound.encode(frame):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    src = tmp_path / "in"
    src.write_bytes(buf.getvalue())
    outcome = analyse_video(src, tmp_path, keep_location=False, content_type="video/mp4")
    assert outcome.ready, outcome.reason
    assert outcome.rewritten is not None
    served = outcome.rewritten.read_bytes()
    assert b"+52.5200" not in served
    with av.open(io.BytesIO(served), "r") as copy:
        assert sorted(s.type for s in copy.streams) == ["audio", "video"]


async def test_sha256_mismatch_is_rejected_and_match_is_ready(local_api: Api) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    data = b"log line 1\nlog line 2\n"
    wrong = hashlib.sha256(b"something else").hexdigest()
    att = await processed(api, user, data, kind="log", sha256=wrong)
    assert att["status"] == "rejected", att
    assert "sha256" in att["reason"], att
    assert att["url"] is None
    assert await api.state.store.stat(original_key(app, att["id"])) is None

    right = hashlib.sha256(data).hexdigest().upper()
    att = await processed(api, user, data, kind="log", sha256=right)
    assert att["status"] == "ready", att


async def test_keep_photo_location_keeps_gps(local_api: Api) -> None:
    api = local_api
    app = await api.create_app(keep_photo_location=True)
    user = await api.user_headers(app)
    photo = jpeg_with_gps(640, 480)
    att = await processed(
        api, user, photo, filename="IMG.jpg", content_type="image/jpeg", kind="photo"
    )
    assert att["status"] == "ready", att
    stored = Image.open(io.BytesIO((await get(api, att["url"])).content))
    gps = stored.getexif().get_ifd(0x8825)
    assert gps.get(1) == "N"
    assert tuple(float(x) for x in gps[2]) == (48.0, 8.0, 0.0)
    assert stored.getexif().get(0x0110) == "TestPhone"


XMP_GPS = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF'
    b' xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about=""'
    b' xmlns:exif="http://ns.adobe.com/exif/1.0/" exif:GPSLatitude="52,31.2N"'
    b' exif:GPSLongitude="13,24.3E"/></rdf:RDF></x:xmpmeta>'
)


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("JPEG", "image/jpeg"), ("HEIF", "image/heic"), ("WEBP", "image/webp")],
)
async def test_a_location_in_xmp_is_removed_too(
    local_api: Api, fmt: str, content_type: str
) -> None:
    """XMP carries a position as well as EXIF does (exif:GPSLatitude): a photo with
    either loses both, whole XMP packet and GPS IFD, unless the app keeps locations.
    (Only EXIF GPS was looked for: a JPEG with XMP alone was served as sent, and a HEIC
    rewritten for its EXIF got its XMP written back by pillow-heif.)"""
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    for with_exif in (False, True):
        exif = Image.Exif()
        if with_exif:
            exif.get_ifd(0x8825)[1] = "N"
        buf = io.BytesIO()
        Image.new("RGB", (300, 200), (1, 2, 3)).save(buf, fmt, xmp=XMP_GPS, exif=exif)
        assert b"GPSLatitude" in buf.getvalue()
        att = await processed(
            api, user, buf.getvalue(), filename="IMG", content_type=content_type, kind="photo"
        )
        assert att["status"] == "ready", att
        served = (await get(api, att["url"])).content
        assert b"GPSLatitude" not in served
        assert 0x8825 not in Image.open(io.BytesIO(served)).getexif()


async def test_a_failed_attempt_leaves_the_upload_for_the_next(local_api: Api) -> None:
    """Processing stores what it rewrote beside the upload and switches to it only with
    the row, so an attempt that fails after rewriting (here the thumbnail's store) is
    followed by one that checks the same bytes again; the upload is deleted once the
    row points at the rewritten photo. (The rewrite replaced the upload in place, so
    the retry found bytes that no longer matched the declared sha256, rejected the
    photo and deleted it.)"""
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    photo = jpeg_with_gps()
    up = await uploaded(
        api,
        user,
        photo,
        filename="IMG.jpg",
        content_type="image/jpeg",
        kind="photo",
        sha256=hashlib.sha256(photo).hexdigest(),
    )
    assert (await complete(api, user, up["upload_id"])).status_code == 200
    store = api.state.store
    real_upload = store.upload_file
    failed: list[str] = []

    async def flaky_upload(key: str, source: Path, content_type: str) -> None:
        if key.endswith("thumb.jpg") and not failed:
            failed.append(key)
            raise OSError("storage hiccup")
        await real_upload(key, source, content_type)

    store.upload_file = flaky_upload  # type: ignore[method-assign]
    await run_jobs(api)
    assert failed
    assert (await attachment(api, user, up["upload_id"])).json()["status"] == "processing"
    assert await store.stat(original_key(app, up["upload_id"])) is not None
    async with api.state.db.session(write=True) as db:  # the retry is due now
        await db.execute(update(Job).where(Job.status == "queued").values(run_after=func.now()))
    await run_jobs(api)
    att = (await attachment(api, user, up["upload_id"])).json()
    assert att["status"] == "ready", att
    assert 0x8825 not in Image.open(io.BytesIO((await get(api, att["url"])).content)).getexif()
    assert await store.stat(original_key(app, up["upload_id"])) is None
    assert await store.stat(processed_key(app, up["upload_id"])) is not None


async def test_processing_that_fails_for_good_rejects_the_attachment_visibly(
    storage_api: Api,
) -> None:
    """The media job cannot succeed (here storage lost the upload's bytes; a file that
    crashes or outlasts processing on every attempt ends the same way): the attachment
    is `rejected` with a reason, and open screens hear of it, instead of staying
    `processing` for good."""
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    up = await uploaded(api, user, png(), filename="p.png", content_type="image/png", kind="photo")
    assert (await complete(api, user, up["upload_id"])).status_code == 200
    conv = await api.feedback(user, attachment_ids=[up["upload_id"]])
    await api.state.store.delete(kept_key(api, app, up["upload_id"]))
    await run_jobs(api)
    att = (await attachment(api, user, up["upload_id"])).json()
    assert (att["status"], att["reason"], att["url"]) == (
        "rejected",
        "the server could not process this file",
        None,
    )
    async with api.state.db.session(write=False) as db:
        job = (await db.scalars(select(Job).where(Job.kind == "media.process"))).one()
        events = list(await db.scalars(select(Event).where(Event.type == "attachment.updated")))
    assert (job.status, job.attempts) == ("failed", 1)
    announced = [(e.conversation_id, (e.data or {}).get("status")) for e in events]
    assert announced == [(uuid.UUID(conv["id"]), "rejected")]


async def photo_processed_while(
    api: Api, app: AppInfo, user: dict[str, str], meanwhile: Callable[[str], Awaitable[None]]
) -> str:
    """A photo with a location, uploaded and completed; the media job runs, and
    ``meanwhile(upload_id)`` once the job has downloaded it (then the jobs it queued
    run). Checks that no file of it is left in storage; returns its id."""
    up = await uploaded(
        api, user, jpeg_with_gps(), filename="IMG.jpg", content_type="image/jpeg", kind="photo"
    )
    assert (await complete(api, user, up["upload_id"])).status_code == 200
    store = api.state.store
    real_download = store.download

    async def download_then(key: str, target: Path) -> None:
        await real_download(key, target)
        await meanwhile(up["upload_id"])

    store.download = download_then  # type: ignore[method-assign]
    await run_jobs(api)
    store.download = real_download  # type: ignore[method-assign]
    await run_jobs(api)
    for key in (
        original_key(app, up["upload_id"]),
        processed_key(app, up["upload_id"]),
        thumb_key(app, up["upload_id"]),
    ):
        assert await store.stat(key) is None, key
    return str(up["upload_id"])


async def test_aborting_a_photo_while_it_is_processed_leaves_no_file(local_api: Api) -> None:
    """An end user removes a photo from the message they are writing while the media job
    works on it: what the job then stores has no row pointing at it, and goes."""
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)

    async def abort(upload_id: str) -> None:
        r = await api.http.delete(f"/v1/client/uploads/{upload_id}", headers=user)
        assert r.status_code == 204, r.text

    upload_id = await photo_processed_while(api, app, user, abort)
    assert (await attachment(api, user, upload_id)).json()["status"] == "aborted"


async def test_erasing_the_user_while_their_photo_is_processed_leaves_no_file(
    local_api: Api,
) -> None:
    """An end user erased while the media job works on their photo: what the job then
    stores (the rewritten photo, the thumbnail) has no row to point at it, and goes."""
    api = local_api
    app = await api.create_app()
    token = identity_token(app.identity_secret, "erase-me", kid=app.identity_kid)
    session = await api.session(app, user_token=token)
    user = api.bearer(session["session_token"])

    async def erase(_: str) -> None:
        path = f"/v1/admin/apps/{app.id}/users/{session['user']['id']}"
        assert (await api.http.delete(path, headers=api.admin)).status_code == 204

    await photo_processed_while(api, app, user, erase)


async def due_now(api: Api) -> None:
    """Play the clock forward: every queued job (a deletion waiting for upload URLs to
    expire, a retry) is due now."""
    async with api.state.db.session(write=True) as db:
        await db.execute(update(Job).where(Job.status == "queued").values(run_after=func.now()))


def late_put_taken(api: Api, r: httpx.Response) -> bool:
    """A PUT to the URL of an upload no longer ``pending``: refused by the local store,
    taken by S3 (a presigned URL cannot be revoked before it expires)."""
    if api.state.store.revokes_upload_urls:
        problem(r, 403, "forbidden")
        return False
    assert r.status_code == 200, r.text
    return True


async def test_a_completed_uploads_url_takes_no_more_bytes(storage_api: Api) -> None:
    """A PUT URL is signed for an hour, but once its upload is completed the bytes have
    been checked (type, size; then processing removed the location): bytes sent after
    that never reach the attachment, so nothing goes around the checks. The local store
    refuses them; on S3, which takes them, the attachment is a copy made at `complete`,
    and what the URL put is deleted once it expired. (They were served: a `ready` photo
    could become a page of script, or get its location back.)"""
    api = storage_api
    store = api.state.store
    app = await api.create_app()
    user = await api.user_headers(app)
    photo = jpeg_with_gps()
    up = await uploaded(
        api, user, photo, filename="IMG.jpg", content_type="image/jpeg", kind="photo"
    )
    assert (await complete(api, user, up["upload_id"])).status_code == 200
    sneaked = b"<html><script>alert(1)</script>" + b"-" * (len(photo) - 31)
    for _ in range(2):  # while processing, then once ready
        r = await put(api, up["single"]["url"], sneaked, up["single"]["headers"])
        taken = late_put_taken(api, r)
        await run_jobs(api)
    att = (await attachment(api, user, up["upload_id"])).json()
    served = (await get(api, att["url"])).content
    assert served.startswith(b"\xff\xd8")
    assert 0x8825 not in Image.open(io.BytesIO(served)).getexif()
    sent_to = original_key(app, up["upload_id"])
    assert (await store.stat(sent_to) is not None) == taken
    await due_now(api)  # the URL has expired
    await run_jobs(api)
    assert await store.stat(sent_to) is None


async def test_a_completed_files_url_cannot_change_what_agents_download(
    storage_api: Api,
) -> None:
    """A file or a log, which processing never rewrites: bytes sent to its URL after
    `complete` (more of them than were declared and checked, or other ones) are not what
    the attachment serves."""
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    _, agent = await api.create_agent(app)
    up = await uploaded(api, user, b"boot ok\n", filename="app.log", kind="log")
    assert (await complete(api, user, up["upload_id"])).status_code == 200
    conv = await api.feedback(user, attachment_ids=[up["upload_id"]])
    s3 = not api.state.store.revokes_upload_urls
    r = await put(api, up["single"]["url"], b"X" * 100_000, up["single"]["headers"])
    if s3:  # more than the URL's signed Content-Length
        assert r.status_code == 403, r.text
        assert "SignatureDoesNotMatch" in r.text
    else:
        late_put_taken(api, r)
    r = await put(api, up["single"]["url"], b"HACKED!\n", up["single"]["headers"])
    late_put_taken(api, r)
    await run_jobs(api)
    r = await api.http.get(f"/v1/agent/conversations/{conv['id']}/messages", headers=agent)
    (shown,) = r.json()["items"][0]["attachments"]
    assert (shown["status"], shown["size"]) == ("ready", 8)
    assert (await get(api, shown["url"])).content == b"boot ok\n"


async def test_both_stores_copy_an_object_and_tell_a_missing_one(
    storage_api: Api, tmp_path: Path
) -> None:
    store = storage_api.state.store
    source = tmp_path / "source"
    source.write_bytes(b"as sent\n")
    await store.upload_file("apps/x/att/y/original", source, "text/plain")
    assert await store.copy("apps/x/att/y/original", "apps/x/att/y/sealed")
    assert await store.read_head("apps/x/att/y/sealed", 100) == b"as sent\n"
    assert not await store.copy("apps/x/att/z/original", "apps/x/att/y/sealed")
    assert await store.read_head("apps/x/att/y/sealed", 100) == b"as sent\n"


@pytest.mark.parametrize("leaves", ["aborted", "expired", "erased"])
async def test_an_upload_that_left_pending_keeps_nothing_its_url_sends(
    storage_api: Api, leaves: str
) -> None:
    """A single upload aborted, expired, or whose end user was erased: on S3 its URL
    still takes bytes until it expires, and what it put is deleted then. (It stayed in
    the bucket for good, with no row pointing at it: after an erasure, too.)"""
    api = storage_api
    store = api.state.store
    app = await api.create_app()
    token = identity_token(app.identity_secret, f"late-{leaves}", kid=app.identity_kid)
    session = await api.session(app, user_token=token)
    user = api.bearer(session["session_token"])
    up = await uploaded(api, user, b"first try\n")
    if leaves == "aborted":
        r = await api.http.delete(f"/v1/client/uploads/{up['upload_id']}", headers=user)
        assert r.status_code == 204, r.text
    elif leaves == "expired":
        async with api.state.db.session(write=True) as db:
            await db.execute(
                update(Attachment)
                .where(Attachment.id == uuid.UUID(up["upload_id"]))
                .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
            )
        assert await expire_abandoned_uploads(api.state) == 1
    else:
        path = f"/v1/admin/apps/{app.id}/users/{session['user']['id']}"
        assert (await api.http.delete(path, headers=api.admin)).status_code == 204
    await run_jobs(api)
    sent_to = original_key(app, up["upload_id"])
    assert await store.stat(sent_to) is None
    r = await put(api, up["single"]["url"], b"sent late\n", up["single"]["headers"])
    assert (await store.stat(sent_to) is not None) == late_put_taken(api, r)
    await run_jobs(api)  # not yet: the URL is still valid
    assert (await store.stat(sent_to) is not None) == (not store.revokes_upload_urls)
    await due_now(api)
    await run_jobs(api)
    assert await store.stat(sent_to) is None


# ----- broken uploads ----------------------------------------------------------------------


async def test_fewer_bytes_than_declared_is_upload_incomplete(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    up = await start_upload(
        api, user, filename="a.txt", content_type="text/plain", size=2000, kind="file"
    )
    r = await put(api, up["single"]["url"], b"a" * 1000, up["single"]["headers"])
    if api.state.store.kind == "local":
        assert r.status_code == 200, r.text  # a short body is found at complete
    else:  # the URL is signed for exactly 2000 bytes
        assert r.status_code == 403, r.text
        assert "SignatureDoesNotMatch" in r.text
    problem(await complete(api, user, up["upload_id"]), 409, "upload_incomplete")
    assert (await upload_status(api, user, up["upload_id"])).json()["status"] == "pending"
    att = (await attachment(api, user, up["upload_id"])).json()
    assert att["status"] == "pending"
    assert att["url"] is None
    r = await api.http.post(
        "/v1/client/conversations",
        json={"body": "see file", "attachment_ids": [up["upload_id"]]},
        headers=user,
    )
    problem(r, 422, "validation_failed")
    # the client resends the whole file; now it completes
    r = await put(api, up["single"]["url"], b"a" * 2000, up["single"]["headers"])
    assert r.status_code == 200, r.text
    r = await complete(api, user, up["upload_id"])
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "processing"


async def test_more_bytes_than_declared_is_refused(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    up = await start_upload(
        api, user, filename="a.txt", content_type="text/plain", size=1000, kind="file"
    )
    r = await put(api, up["single"]["url"], b"b" * 2000, up["single"]["headers"])
    if api.state.store.kind == "local":
        problem(r, 413, "payload_too_large")
    else:  # S3 checks the signed Content-Length before it takes a byte
        assert r.status_code == 403, r.text
        assert "SignatureDoesNotMatch" in r.text
    assert await api.state.store.stat(original_key(app, up["upload_id"])) is None
    problem(await complete(api, user, up["upload_id"]), 409, "upload_incomplete")
    status = (await upload_status(api, user, up["upload_id"])).json()
    assert status["status"] == "pending"
    assert (await attachment(api, user, up["upload_id"])).json()["url"] is None
    r = await api.http.post(
        "/v1/client/conversations",
        json={"body": "see file", "attachment_ids": [up["upload_id"]]},
        headers=user,
    )
    problem(r, 422, "validation_failed")


async def test_local_put_size_is_enforced_while_streaming(local_api: Api) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    up = await start_upload(
        api, user, filename="a.txt", content_type="text/plain", size=1000, kind="file"
    )

    async def body() -> AsyncIterator[bytes]:  # chunked: no Content-Length to check upfront
        for _ in range(10):
            yield b"c" * 300

    r = await api.http.put(up["single"]["url"], content=body())
    assert "content-length" not in r.request.headers
    problem(r, 413, "payload_too_large")
    assert await api.state.store.stat(original_key(app, up["upload_id"])) is None
    leftovers = [p for p in local_store(api).root.rglob("*") if p.is_file()]
    assert leftovers == []


async def test_path_traversal_unicode_filename_is_display_name_only(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    raw_name = "../../ünï/😀 x.png"
    data = png()
    up = await start_upload(
        api, user, filename=raw_name, content_type="image/png", size=len(data), kind="photo"
    )
    upload_url = unquote(up["single"]["url"])
    for fragment in ("ünï", "😀", "x.png", ".."):
        assert fragment not in upload_url, upload_url
    assert (await put(api, up["single"]["url"], data, up["single"]["headers"])).status_code == 200
    r = await complete(api, user, up["upload_id"])
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == "😀 x.png"
    await run_jobs(api)
    att = (await attachment(api, user, up["upload_id"])).json()
    assert att["status"] == "ready", att
    assert att["filename"] == "😀 x.png"
    row = await db_row(api, up["upload_id"])
    assert row.storage_key == kept_key(api, app, up["upload_id"])
    assert row.thumbnail_key == thumb_key(app, up["upload_id"])
    assert row.filename == "😀 x.png"
    download = await get(api, att["url"])
    assert download.status_code == 200
    assert download.content == data
    assert quote("😀 x.png") in download.headers["content-disposition"]
    if api.state.store.kind == "local":
        stored = sorted(
            str(p.relative_to(local_store(api).root))
            for p in local_store(api).root.rglob("*")
            if p.is_file()
        )
        assert stored == [original_key(app, att["id"]), thumb_key(app, att["id"])]


async def test_tampered_and_expired_local_urls_are_forbidden(local_api: Api) -> None:
    api = local_api
    store = local_store(api)
    app = await api.create_app()
    user = await api.user_headers(app)
    data = b"hello"
    up = await start_upload(
        api, user, filename="a.txt", content_type="text/plain", size=len(data), kind="file"
    )
    url = up["single"]["url"]
    sig = dict(parse_qsl(urlsplit(url).query))["sig"]
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    for bad in (
        with_query(url, sig=flipped),
        with_query(url, max=str(100 * MIB)),  # a larger allowance than was signed
        with_query(url, exp=str(int(dt.datetime.now(dt.UTC).timestamp()) + 86400 * 365)),
        with_query(url, op="get"),
        url.replace(f"/att/{up['upload_id']}/", f"/att/{uuid.uuid4()}/"),
    ):
        problem(await api.http.put(bad, content=data), 403, "forbidden")
    assert await store.stat(original_key(app, up["upload_id"])) is None

    key = original_key(app, up["upload_id"])
    expired_put = store.sign(
        SignedOp("put", key, len(data), "", 0, "", "text/plain"), dt.timedelta(seconds=-60)
    )
    problem(await api.http.put(expired_put, content=data), 403, "forbidden")
    assert await store.stat(key) is None

    # the genuine URL still works, and so does a genuine download URL ...
    assert (await api.http.put(url, content=data)).status_code == 200
    good_get = store.sign(SignedOp("get", key, 0, "", 0, "", "text/plain"), dt.timedelta(minutes=5))
    r = await api.http.get(good_get)
    assert r.status_code == 200
    assert r.content == data
    # ... but not an expired or tampered one
    expired_get = store.sign(
        SignedOp("get", key, 0, "", 0, "", "text/plain"), dt.timedelta(seconds=-60)
    )
    problem(await api.http.get(expired_get), 403, "forbidden")
    problem(await api.http.get(with_query(good_get, ct="text/html")), 403, "forbidden")
    problem(await api.http.get(with_query(good_get, sig=flipped)), 403, "forbidden")


async def test_complete_with_part_out_of_range_is_409(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    blob = multipart_blob()
    up = await start_multipart(api, user, blob)
    mp = up["multipart"]
    chunks = chunks_of(blob, mp["part_size"], 3)
    etags = {n: await put_part(api, up, n, chunks[n]) for n in (1, 2, 3)}
    listed = [{"part_number": n, "etag": etags[n]} for n in (1, 2, 3)]

    problem(
        await complete(
            api, user, up["upload_id"], [*listed, {"part_number": 99, "etag": etags[1]}]
        ),
        409,
        "upload_incomplete",
    )
    problem(await complete(api, user, up["upload_id"], listed[:2]), 409, "upload_incomplete")
    wrong_etag: list[dict[str, Any]] = [*listed[:2], {"part_number": 3, "etag": etags[1]}]
    problem(await complete(api, user, up["upload_id"], wrong_etag), 409, "upload_incomplete")
    assert (await upload_status(api, user, up["upload_id"])).json()["status"] == "pending"

    r = await complete(api, user, up["upload_id"], listed)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "processing"


async def test_a_part_url_takes_no_more_than_its_part(storage_api: Api) -> None:
    """Each part's URL is signed for that part's length (the last part: the remainder).
    On S3 the signature covers `Content-Length`, so any other length is refused before a
    byte is stored; the local store signs the part size as a maximum and finds a short
    part at complete."""
    api = storage_api
    s3 = api.state.store.kind == "s3"
    app = await api.create_app()
    user = await api.user_headers(app)
    blob = multipart_blob()
    up = await start_multipart(api, user, blob)
    chunks = chunks_of(blob, up["multipart"]["part_size"], 3)
    urls = {p["part_number"]: p["url"] for p in up["multipart"]["parts"]}
    for number, body in [(1, chunks[1] + b"x"), (3, chunks[3] + b"x")]:
        r = await put(api, urls[number], body)
        if s3:
            assert r.status_code == 403, r.text
            assert "SignatureDoesNotMatch" in r.text
        elif number == 1:
            problem(r, 413, "payload_too_large")
    r = await put(api, urls[2], chunks[2][:-1])
    assert r.status_code == (403 if s3 else 200), r.text
    status = (await upload_status(api, user, up["upload_id"])).json()
    stored = {p["part_number"]: p["size"] for p in status["uploaded_parts"]}
    assert stored == ({} if s3 else {2: len(chunks[2]) - 1, 3: len(chunks[3]) + 1})
    # A part of the wrong length is not done: resuming hands out its URL again (it was
    # listed as done, so the upload could never complete through the resume path).
    fresh = [p["part_number"] for p in status["multipart"]["parts"]]
    assert fresh == [1, 2, 3]
    problem(
        await complete(
            api, user, up["upload_id"], [{"part_number": n, "etag": "x"} for n in (1, 2, 3)]
        ),
        409,
        "upload_incomplete",
    )
    etags = {n: await put_part(api, up, n, chunks[n]) for n in (1, 2, 3)}
    assert not (await upload_status(api, user, up["upload_id"])).json()["multipart"]["parts"]
    parts = [{"part_number": n, "etag": etags[n]} for n in (1, 2, 3)]
    r = await complete(api, user, up["upload_id"], parts)
    assert r.status_code == 200, r.text
    await run_jobs(api)
    att = (await attachment(api, user, up["upload_id"])).json()
    assert att["status"] == "ready", att
    assert (await get(api, att["url"])).content == blob


async def test_s3_upload_urls_sign_the_length_unless_told_not_to(s3_endpoint: str) -> None:
    """`TELLBACK_S3_SIGN_CONTENT_LENGTH=false`, for a proxy in front of storage that
    re-frames bodies, signs the host alone, as minio does: S3 then takes any length
    (`complete` still checks it)."""
    from tellback_server.storage.s3 import S3Store

    for sign, longer in ((True, 403), (False, 200)):
        store = S3Store(s3_settings(s3_endpoint, sign_content_length=sign))
        await store.ensure_ready()
        req = await store.presign_put("a/original", "text/plain", 5, dt.timedelta(minutes=5))
        async with httpx.AsyncClient() as http:
            assert (await http.put(req.url, content=b"hello")).status_code == 200
            r = await http.put(req.url, content=b"hello, world")
        assert r.status_code == longer, r.text
        assert ("content-length%3Bhost" in req.url) == sign


async def test_uploading_the_same_part_twice_is_harmless(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    blob = multipart_blob()
    up = await start_multipart(api, user, blob)
    chunks = chunks_of(blob, up["multipart"]["part_size"], 3)
    first = await put_part(api, up, 1, chunks[1])
    again = await put_part(api, up, 1, chunks[1])
    assert first == again
    status = (await upload_status(api, user, up["upload_id"])).json()
    assert [(p["part_number"], p["etag"], p["size"]) for p in status["uploaded_parts"]] == [
        (1, first, len(chunks[1]))
    ]
    etags = {
        1: first,
        2: await put_part(api, up, 2, chunks[2]),
        3: await put_part(api, up, 3, chunks[3]),
    }
    parts = [{"part_number": n, "etag": etags[n]} for n in (1, 2, 3)]
    r = await complete(api, user, up["upload_id"], parts)
    assert r.status_code == 200, r.text
    await run_jobs(api)
    att = (await attachment(api, user, up["upload_id"])).json()
    assert att["status"] == "ready", att
    assert att["size"] == len(blob)
    assert (await get(api, att["url"])).content == blob


async def test_completing_twice_returns_the_same_attachment(local_api: Api) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    up = await uploaded(api, user, b"twice\n")
    first = await complete(api, user, up["upload_id"])
    second = await complete(api, user, up["upload_id"])
    assert first.status_code == second.status_code == 200, second.text
    volatile = {"url", "thumbnail_url", "expires_at"}

    def stable(r: httpx.Response) -> dict[str, Any]:
        return {k: v for k, v in r.json().items() if k not in volatile}

    assert stable(first) == stable(second)
    assert first.json()["id"] == up["upload_id"]
    assert first.json()["status"] == "processing"
    assert await run_jobs(api) == 1  # processing was queued once
    third = await complete(api, user, up["upload_id"])
    assert third.status_code == 200
    assert third.json()["id"] == up["upload_id"]
    assert third.json()["status"] == "ready"
    assert await attachment_count(api) == 1


async def test_abort_frees_storage_and_cannot_be_completed(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    up = await uploaded(api, user, b"to be aborted\n")
    key = original_key(app, up["upload_id"])
    assert await api.state.store.stat(key) is not None
    r = await api.http.delete(f"/v1/client/uploads/{up['upload_id']}", headers=user)
    assert r.status_code == 204, r.text
    assert await api.state.store.stat(key) is None
    assert (await upload_status(api, user, up["upload_id"])).json()["status"] == "aborted"
    assert (await attachment(api, user, up["upload_id"])).json()["url"] is None
    r = await complete(api, user, up["upload_id"])
    assert r.status_code in {404, 409}, r.text
    assert r.json()["code"] in {"not_found", "upload_incomplete"}
    assert (await upload_status(api, user, up["upload_id"])).json()["status"] == "aborted"


async def test_abort_multipart_frees_its_parts(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    blob = multipart_blob()
    up = await start_multipart(api, user, blob)
    await put_part(api, up, 3, blob[2 * up["multipart"]["part_size"] :])
    row = await db_row(api, up["upload_id"])
    assert row.multipart_upload_id
    store = api.state.store
    assert len(await store.list_parts(row.storage_key, row.multipart_upload_id)) == 1
    r = await api.http.delete(f"/v1/client/uploads/{up['upload_id']}", headers=user)
    assert r.status_code == 204, r.text
    assert await store.list_parts(row.storage_key, row.multipart_upload_id) == []
    assert await store.stat(row.storage_key) is None
    assert (await db_row(api, up["upload_id"])).status == "aborted"
    if store.kind == "local":
        assert not (local_store(api).root / ".multipart" / row.multipart_upload_id).exists()


async def test_abandoned_uploads_expire_and_free_storage(storage_api: Api) -> None:
    api = storage_api
    store = api.state.store
    app = await api.create_app()
    user = await api.user_headers(app)
    single = await uploaded(api, user, b"never completed\n")
    blob = multipart_blob()
    multi = await start_multipart(api, user, blob)
    await put_part(api, multi, 3, blob[2 * multi["multipart"]["part_size"] :])
    fresh = await uploaded(api, user, b"still uploading\n")
    multi_row = await db_row(api, multi["upload_id"])
    assert multi_row.multipart_upload_id
    assert len(await store.list_parts(multi_row.storage_key, multi_row.multipart_upload_id)) == 1

    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    async with api.state.db.session(write=True) as db:
        await db.execute(
            update(Attachment)
            .where(Attachment.id.in_([uuid.UUID(single["upload_id"]), multi_row.id]))
            .values(expires_at=past)
        )
    assert await expire_abandoned_uploads(api.state) == 2

    for up in (single, multi):
        status = (await upload_status(api, user, up["upload_id"])).json()
        assert status["status"] == "expired", status
        assert status["reason"], status
        assert status["uploaded_parts"] == []
        assert await store.stat(original_key(app, up["upload_id"])) is None
    assert (await db_row(api, multi["upload_id"])).multipart_upload_id is None
    assert await store.list_parts(multi_row.storage_key, multi_row.multipart_upload_id) == []
    if store.kind == "local":
        assert not (local_store(api).root / ".multipart" / multi_row.multipart_upload_id).exists()
    # the upload that is still within its time is untouched
    assert (await upload_status(api, user, fresh["upload_id"])).json()["status"] == "pending"
    assert await store.stat(original_key(app, fresh["upload_id"])) is not None
    assert await expire_abandoned_uploads(api.state) == 0
    # an expired upload cannot be completed any more
    for up in (single, multi):
        r = await complete(api, user, up["upload_id"])
        assert r.status_code in {404, 409}, r.text
        assert r.json()["code"] in {"not_found", "upload_incomplete"}


# ----- whose upload is it ------------------------------------------------------------------


async def test_other_users_uploads_are_not_found(local_api: Api) -> None:
    api = local_api
    app = await api.create_app("A")
    other_app = await api.create_app("B")
    owner = await api.user_headers(app)
    neighbour = await api.user_headers(app)
    stranger = await api.user_headers(other_app)
    pending = await uploaded(api, owner, b"pending\n")
    done = await processed(api, owner, b"done\n")
    assert done["status"] == "ready"

    for intruder in (neighbour, stranger):
        for upload_id in (pending["upload_id"], done["id"]):
            problem(await complete(api, intruder, upload_id), 404, "not_found")
            problem(await upload_status(api, intruder, upload_id), 404, "not_found")
            problem(await attachment(api, intruder, upload_id), 404, "not_found")
            r = await api.http.delete(f"/v1/client/uploads/{upload_id}", headers=intruder)
            problem(r, 404, "not_found")
    # an unknown id answers the same
    problem(await complete(api, neighbour, str(uuid.uuid4())), 404, "not_found")

    # nothing changed for the owner
    assert (await upload_status(api, owner, pending["upload_id"])).json()["status"] == "pending"
    r = await complete(api, owner, pending["upload_id"])
    assert r.status_code == 200, r.text
    assert (await attachment(api, owner, done["id"])).json()["status"] == "ready"


async def test_attachment_ids_accept_only_own_completed_unattached_uploads(
    local_api: Api,
) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    neighbour = await api.user_headers(app)
    ready = await processed(api, user, b"mine\n")
    theirs = await processed(api, neighbour, b"theirs\n")
    pending = await uploaded(api, user, b"not completed\n")
    rejected = await uploaded(
        api, user, b"not a jpeg", filename="a.jpg", content_type="image/jpeg", kind="photo"
    )
    problem(await complete(api, user, rejected["upload_id"]), 415, "unsupported_media_type")
    aborted = await uploaded(api, user, b"aborted\n")
    r = await api.http.delete(f"/v1/client/uploads/{aborted['upload_id']}", headers=user)
    assert r.status_code == 204

    for bad in (
        [theirs["id"]],
        [pending["upload_id"]],
        [rejected["upload_id"]],
        [aborted["upload_id"]],
        [str(uuid.uuid4())],
        ["not-a-uuid"],
        [ready["id"], ready["id"]],
    ):
        r = await api.http.post(
            "/v1/client/conversations", json={"body": "x", "attachment_ids": bad}, headers=user
        )
        problem(r, 422, "validation_failed")
    assert (await api.http.get("/v1/client/conversations", headers=user)).json()["items"] == []

    conv = await api.feedback(user, attachment_ids=[ready["id"]])
    assert [a["id"] for a in conv["last_message"]["attachments"]] == [ready["id"]]
    # once attached it cannot be attached again, not even to a message of the same user
    r = await api.http.post(
        f"/v1/client/conversations/{conv['id']}/messages",
        json={"attachment_ids": [ready["id"]]},
        headers=user,
    )
    problem(r, 422, "validation_failed")


async def test_agent_sees_attachments_of_its_apps_conversations_only(local_api: Api) -> None:
    api = local_api
    app = await api.create_app("A")
    other_app = await api.create_app("B")
    _, agent = await api.create_agent(app, name="Ada")
    _, other_agent = await api.create_agent(other_app, name="Bob")
    user = await api.user_headers(app)
    data = b"crash log\n"
    on_conv = await processed(api, user, data, kind="log")
    loose = await processed(api, user, b"not sent\n")
    await api.feedback(user, attachment_ids=[on_conv["id"]])

    r = await api.http.get(f"/v1/agent/attachments/{on_conv['id']}", headers=agent)
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["id"] == on_conv["id"]
    assert seen["status"] == "ready"
    assert seen["kind"] == "log"
    assert (await get(api, seen["url"])).content == data

    problem(
        await api.http.get(f"/v1/agent/attachments/{on_conv['id']}", headers=other_agent),
        404,
        "not_found",
    )
    # an upload not (yet) on any conversation is the user's alone
    problem(
        await api.http.get(f"/v1/agent/attachments/{loose['id']}", headers=agent), 404, "not_found"
    )
    problem(
        await api.http.get(f"/v1/agent/attachments/{uuid.uuid4()}", headers=agent),
        404,
        "not_found",
    )
    # end-user credentials are not agent credentials
    r = await api.http.get(f"/v1/agent/attachments/{on_conv['id']}", headers=user)
    problem(r, 401, "unauthenticated")


async def test_attachment_on_a_message_is_listed_with_a_working_url(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    conv = await api.feedback(user, body="It crashes when I upload")
    data = b'{"event": "crash", "line": 42}'
    att = await processed(
        api, user, data, filename="crash.json", content_type="application/json", kind="log"
    )
    assert att["status"] == "ready", att
    r = await api.http.post(
        f"/v1/client/conversations/{conv['id']}/messages",
        json={"body": "here is the log", "attachment_ids": [att["id"]]},
        headers=user,
    )
    assert r.status_code == 201, r.text
    message_id = r.json()["id"]
    assert [a["id"] for a in r.json()["attachments"]] == [att["id"]]

    r = await api.http.get(f"/v1/client/conversations/{conv['id']}/messages", headers=user)
    assert r.status_code == 200, r.text
    messages = r.json()["items"]
    assert [m["attachments"] for m in messages if m["id"] != message_id] == [[]]
    (listed,) = next(m for m in messages if m["id"] == message_id)["attachments"]
    assert listed["id"] == att["id"]
    assert listed["status"] == "ready"
    assert listed["filename"] == "crash.json"
    assert listed["content_type"] == "application/json"
    assert listed["size"] == len(data)
    download = await get(api, listed["url"])
    assert download.status_code == 200
    assert download.content == data


# ----- storage outage ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, MULTIPART_SIZE], ids=["single", "multipart"])
async def test_storage_down_is_503_and_creates_no_upload(
    database_url: str, tmp_path: Path, size: int
) -> None:
    down = S3Settings(
        endpoint="127.0.0.1:1",
        access_key="unused-key",
        secret_key="unused-secret-0123456789",
        bucket="tb-down",
        secure=False,
        region="us-east-1",
    )
    settings = make_settings(database_url, tmp_path / "data", port=8080, s3=down)
    async with serve(settings) as api:
        app = await api.create_app()
        user = await api.user_headers(app)
        r = await api.http.post(
            "/v1/client/uploads",
            json={"filename": "a.zip", "content_type": "application/zip", "size": size,
                  "kind": "file"},
            headers=user,
        )  # fmt: skip
        problem(r, 503, "storage_unavailable")
        assert int(r.headers["retry-after"]) > 0
        assert await attachment_count(api) == 0


# ----- erasure -----------------------------------------------------------------------------


async def test_erasing_a_user_removes_conversations_and_stored_files(storage_api: Api) -> None:
    api = storage_api
    store = api.state.store
    app = await api.create_app()
    _, agent = await api.create_agent(app)
    token = identity_token(app.identity_secret, "user-42", kid=app.identity_kid)
    user = await api.user_headers(app, user_token=token)
    photo = await processed(
        api,
        user,
        jpeg_with_gps(300, 200),
        filename="IMG.jpg",
        content_type="image/jpeg",
        kind="photo",
    )
    assert photo["status"] == "ready", photo
    conv = await api.feedback(user, attachment_ids=[photo["id"]])
    stray = await processed(api, user, b"never sent\n")
    pending = await uploaded(api, user, b"half way\n")
    other = await api.user_headers(app)
    kept = await processed(api, other, b"keep me\n")
    other_conv = await api.feedback(other, attachment_ids=[kept["id"]])
    keys = [
        processed_key(app, photo["id"]),
        thumb_key(app, photo["id"]),
        kept_key(api, app, stray["id"]),
        original_key(app, pending["upload_id"]),
    ]
    for key in keys:
        assert await store.stat(key) is not None, key

    r = await api.http.get(
        f"/v1/admin/apps/{app.id}/users", params={"external_id": "user-42"}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    (found,) = r.json()["items"]
    assert found["external_id"] == "user-42"
    r = await api.http.delete(f"/v1/admin/apps/{app.id}/users/{found['id']}", headers=api.admin)
    assert r.status_code == 204, r.text

    problem(
        await api.http.get(f"/v1/agent/conversations/{conv['id']}", headers=agent),
        404,
        "not_found",
    )
    r = await api.http.get("/v1/agent/conversations", params={"app_id": app.id}, headers=agent)
    assert [c["id"] for c in r.json()["items"]] == [other_conv["id"]]
    problem(
        await api.http.get(f"/v1/agent/attachments/{photo['id']}", headers=agent), 404, "not_found"
    )
    r = await api.http.get(
        f"/v1/admin/apps/{app.id}/users", params={"external_id": "user-42"}, headers=api.admin
    )
    assert r.json()["items"] == []
    # the erased user's session is dead
    r = await api.http.get("/v1/client/conversations", headers=user)
    problem(r, 401, "unauthenticated")

    await run_jobs(api)
    for key in keys:
        assert await store.stat(key) is None, key
    # the other user's file and conversation are untouched
    assert await store.stat(kept_key(api, app, kept["id"])) is not None
    r = await api.http.get(f"/v1/agent/attachments/{kept['id']}", headers=agent)
    assert r.status_code == 200
    assert (await get(api, r.json()["url"])).content == b"keep me\n"


async def test_erasing_a_user_leaves_no_upload_device_or_stored_answer(storage_api: Api) -> None:
    """Erasure also aborts their multipart uploads under way (whose parts stayed, and
    whose URLs took more), and deletes the device context their installations reported
    and the stored answers to their requests (sealed, yet holding what they wrote)."""
    api = storage_api
    app = await api.create_app()
    token = identity_token(app.identity_secret, "user-43", kid=app.identity_kid)
    session = await api.session(app, installation_id="phone-of-43", user_token=token)
    user = api.bearer(session["session_token"])
    r = await api.http.post(
        "/v1/client/conversations",
        json={"body": "at home", "location": {"latitude": 52.5, "longitude": 13.4}},
        headers={**user, "Idempotency-Key": "k-43"},
    )
    assert r.status_code == 201, r.text
    blob = multipart_blob()
    up = await start_multipart(api, user, blob)
    size = up["multipart"]["part_size"]
    await put_part(api, up, 1, blob[:size])
    row = await db_row(api, up["upload_id"])
    key, upload_id = row.storage_key, row.multipart_upload_id or ""
    store = api.state.store
    assert len(await store.list_parts(key, upload_id)) == 1

    path = f"/v1/admin/apps/{app.id}/users/{session['user']['id']}"
    assert (await api.http.delete(path, headers=api.admin)).status_code == 204
    await run_jobs(api)
    assert await store.list_parts(key, upload_id) == []
    if store.kind == "local":
        assert not (local_store(api).root / ".multipart" / upload_id).exists()
    url = next(p["url"] for p in up["multipart"]["parts"] if p["part_number"] == 2)
    r = await put(api, url, blob[size : 2 * size])
    assert r.status_code in {403, 404}, r.text  # (local: refused; S3: NoSuchUpload)
    async with api.state.db.session(write=False) as db:
        installations = await db.scalar(
            select(func.count()).select_from(Installation).where(Installation.app_id == app.id)
        )
        keys = await db.scalar(
            select(func.count())
            .select_from(IdempotencyKey)
            .where(IdempotencyKey.scope == f"user:{session['user']['id']}")
        )
    assert (installations, keys) == (0, 0)
