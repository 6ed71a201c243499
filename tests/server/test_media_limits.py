"""What bounds the work and the storage one end user's uploads can take: a video's
pixel count, how long a completed upload nobody attached is kept, how many uploads
one end user may have under way, a processing attempt that outlasts its time."""

from __future__ import annotations

import datetime as dt
import io
import uuid
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image
from sqlalchemy import inspect, select, update

from tellback_server.db.models import Attachment
from tellback_server.domain.attachments.media import (
    MAX_PIXELS,
    analyse_video,
    expire_abandoned_uploads,
)
from tests.server.conftest import Api
from tests.server.test_attachments_edge import (
    attachment,
    complete,
    kept_key,
    local_api,
    processed,
    thumb_key,
    uploaded,
)
from tests.server.test_attachments_flow import run_jobs

__all__ = ["local_api"]  # (the fixture, used here)


def png_frame_video(width: int, height: int) -> bytes:
    """A QuickTime file whose one frame is a 1-bit PNG of width x height: a few KB on
    disk, width * height * 3 bytes once decoded to RGB."""
    picture = io.BytesIO()
    Image.new("1", (width, height), 0).save(picture, "PNG", optimize=True)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mov") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "monob"
        stream.time_base = Fraction(1, 1)
        packet = av.Packet(picture.getvalue())
        packet.stream = stream
        packet.pts = packet.dts = 0
        packet.time_base = Fraction(1, 1)
        packet.duration = 1
        container.mux(packet)
    return buf.getvalue()


# Just over the cap (50,013,184 pixels): decoding it whole would take 150 MB in RGB.
SIDE = 7072


def test_a_video_over_the_pixel_cap_is_rejected_before_it_is_decoded(tmp_path: Path) -> None:
    assert SIDE * SIDE > MAX_PIXELS
    video = png_frame_video(SIDE, SIDE)
    assert len(video) < 20_000
    src = tmp_path / "bomb.mov"
    src.write_bytes(video)
    outcome = analyse_video(src, tmp_path, content_type="video/quicktime")
    assert not outcome.ready
    assert outcome.reason == f"the video is too large ({SIDE}x{SIDE} pixels)"
    assert outcome.thumbnail is None
    assert not (tmp_path / "poster.jpg").exists()  # no frame was decoded


def test_a_video_within_the_pixel_cap_is_still_ready(tmp_path: Path) -> None:
    src = tmp_path / "small.mov"
    src.write_bytes(png_frame_video(640, 480))
    outcome = analyse_video(src, tmp_path, content_type="video/quicktime")
    assert outcome.ready, outcome.reason
    assert (outcome.width, outcome.height) == (640, 480)


async def test_an_uploaded_video_over_the_pixel_cap_is_rejected_with_a_reason(
    local_api: Api,
) -> None:
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    video = png_frame_video(SIDE, SIDE)
    att = await processed(
        api, user, video, filename="clip.mov", content_type="video/quicktime", kind="video"
    )
    assert att["status"] == "rejected", att
    assert att["reason"] == f"the video is too large ({SIDE}x{SIDE} pixels)"
    assert att["url"] is None
    assert att["thumbnail_url"] is None


# ----- completed uploads never attached ----------------------------------------------------


async def completed_days_ago(api: Api, att_id: str, days: float) -> None:
    async with api.state.db.session(write=True) as db:
        await db.execute(
            update(Attachment)
            .where(Attachment.id == uuid.UUID(att_id))
            .values(completed_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=days))
        )


async def test_a_completed_upload_never_attached_is_deleted_after_a_week(
    storage_api: Api,
) -> None:
    api = storage_api
    store = api.state.store
    app = await api.create_app()
    user = await api.user_headers(app)
    photo = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 240)).save(photo, "PNG")
    ids = {}
    for name in ("stale", "recent", "attached"):
        att = await processed(
            api,
            user,
            photo.getvalue(),
            filename=f"{name}.png",
            content_type="image/png",
            kind="photo",
        )
        assert att["status"] == "ready", att
        ids[name] = att["id"]
    await api.feedback(user, attachment_ids=[ids["attached"]])
    await completed_days_ago(api, ids["stale"], 7.01)
    await completed_days_ago(api, ids["recent"], 6.9)  # an outbox may still send it
    await completed_days_ago(api, ids["attached"], 30)

    assert await expire_abandoned_uploads(api.state) == 1
    await run_jobs(api)
    stale = (await attachment(api, user, ids["stale"])).json()
    assert stale["status"] == "expired", stale
    assert "never attached" in stale["reason"]
    assert stale["url"] is None
    assert await store.stat(kept_key(api, app, ids["stale"])) is None
    assert await store.stat(thumb_key(app, ids["stale"])) is None
    for name in ("recent", "attached"):
        assert (await attachment(api, user, ids[name])).json()["status"] == "ready"
        assert await store.stat(kept_key(api, app, ids[name])) is not None
        assert await store.stat(thumb_key(app, ids[name])) is not None
    # it cannot be attached any more, and says why
    r = await api.http.post(
        "/v1/client/conversations",
        json={"body": "late", "attachment_ids": [ids["stale"]]},
        headers=user,
    )
    assert r.status_code == 422, r.text
    assert "never attached" in r.text
    assert await expire_abandoned_uploads(api.state) == 0


async def test_expiry_goes_on_until_nothing_due_is_left(local_api: Api) -> None:
    """More than one batch (500) due at once: all of them in one run, not 500 per
    10 minutes (72,000 a day, fewer than one end user can make)."""
    api = local_api
    app = await api.create_app()
    user = await api.user_headers(app)
    pending = await uploaded(api, user, b"never completed\n")
    done = await uploaded(api, user, b"never attached\n")
    assert (await complete(api, user, done["upload_id"])).status_code == 200
    await run_jobs(api)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=8)
    async with api.state.db.session(write=True) as db:
        for template_id in (pending["upload_id"], done["upload_id"]):
            template = await db.scalar(
                select(Attachment).where(Attachment.id == uuid.UUID(template_id))
            )
            assert template is not None
            columns = {
                c.key: getattr(template, c.key)
                for c in inspect(Attachment).column_attrs
                if c.key not in {"id", "created_at", "updated_at"}
            }
            for _ in range(520):
                new_id = uuid.uuid4()
                key = f"apps/{app.id}/att/{new_id}/original"
                db.add(Attachment(**{**columns, "id": new_id, "storage_key": key}))
        await db.execute(update(Attachment).values(expires_at=long_ago, completed_at=long_ago))
        await db.execute(
            update(Attachment).where(Attachment.status == "pending").values(completed_at=None)
        )
    assert await expire_abandoned_uploads(api.state) == 2 * 521
    async with api.state.db.session(write=False) as db:
        statuses = list(await db.scalars(select(Attachment.status)))
    assert statuses == ["expired"] * (2 * 521)


# ----- uploads under way per end user ------------------------------------------------------


async def test_an_end_user_may_have_twenty_uploads_under_way(local_api: Api) -> None:
    api = local_api
    # (a request rate that is not what answers 429 here)
    app = await api.create_app(rate_limits={"user_per_minute": 6000})
    user = await api.user_headers(app)
    other = await api.user_headers(app)
    body = {"filename": "a.txt", "content_type": "text/plain", "size": 10, "kind": "file"}
    ids = []
    for _ in range(20):
        r = await api.http.post("/v1/client/uploads", json=body, headers=user)
        assert r.status_code == 201, r.text
        ids.append(r.json()["upload_id"])
    r = await api.http.post("/v1/client/uploads", json=body, headers=user)
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "rate_limited"
    assert "20 uploads are under way" in r.json()["detail"]
    assert int(r.headers["retry-after"]) > 0
    # another end user is not held up
    r = await api.http.post("/v1/client/uploads", json=body, headers=other)
    assert r.status_code == 201, r.text
    # one completed (or aborted) makes room for the next
    r = await api.http.delete(f"/v1/client/uploads/{ids[0]}", headers=user)
    assert r.status_code == 204, r.text
    r = await api.http.post("/v1/client/uploads", json=body, headers=user)
    assert r.status_code == 201, r.text
