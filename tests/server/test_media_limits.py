"""What bounds the work and the storage one end user's uploads can take: a video's
pixel count, how long a completed upload nobody attached is kept, how many uploads
one end user may have under way, a processing attempt that outlasts its time."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image

from tellback_server.domain.attachments.media import MAX_PIXELS, analyse_video
from tests.server.conftest import Api
from tests.server.test_attachments_edge import local_api, processed

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
