"""Media analysis runs in a bounded child process: a file that needs more memory or time
than processing allows is rejected for good (not retried), the child is killed, and the
server's own memory does not grow by the file's decoded size."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import FrameType

import psutil
import pytest
from PIL import Image
from sqlalchemy import select

from tellback_server.db.models import Job
from tellback_server.domain.attachments import media
from tests.server.conftest import Api
from tests.server.test_attachments_edge import local_api, processed

__all__ = ["local_api"]  # (the fixture, used here)

MiB = 1024 * 1024


def bomb_png() -> bytes:
    """A 7071x7071 RGBA PNG (just under the 50 MP cap) turned by its EXIF orientation:
    about 200 KB on disk, 200 MB once decoded, and as much again for each copy."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGBA", (7071, 7071), (0, 0, 0, 0)).save(
        buf, "PNG", compress_level=1, exif=exif.tobytes()
    )
    return buf.getvalue()


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (VmHWM), where the kernel allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    rss: int = psutil.Process().memory_info().rss
    return rss


def analysis_left_running() -> list[str]:
    """Any child process or thread of ours still analysing a file."""
    left = [
        " ".join(p.cmdline())
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    left = [c for c in left if "attachments.analysis" in c]
    for top in sys._current_frames().values():
        frame: FrameType | None = top
        while frame is not None:
            if frame.f_code.co_name.startswith("analyse"):
                left.append(f"thread in {frame.f_code.co_name}")
            frame = frame.f_back
    return left


async def media_job_attempts(api: Api) -> list[tuple[str, int]]:
    async with api.state.db.session(write=False) as db:
        jobs = await db.execute(select(Job.status, Job.attempts).where(Job.kind == "media.process"))
        return [(status, attempts) for status, attempts in jobs]


async def test_a_photo_that_needs_more_memory_is_rejected_and_the_server_does_not_grow(
    local_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = local_api
    monkeypatch.setattr(media, "ANALYSIS_MEMORY_BYTES", 300 * MiB, raising=False)
    app = await api.create_app()
    user = await api.user_headers(app)
    data = bomb_png()
    exact = reset_peak_rss()
    before = peak_rss() if exact else psutil.Process().memory_info().rss
    att = await processed(api, user, data, filename="p.png", content_type="image/png", kind="photo")
    after = peak_rss() if exact else psutil.Process().memory_info().rss
    # Its decode (200 MB, twice over) happened elsewhere, if at all.
    assert after - before < 100 * MiB, f"grew by {(after - before) // MiB} MiB"
    assert att["status"] == "rejected", att
    assert att["reason"] == "the file needs more memory than processing allows"
    assert await media_job_attempts(api) == [("done", 1)]
    assert analysis_left_running() == []


async def test_a_photo_that_outlasts_processing_is_killed_and_rejected_not_retried(
    local_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = local_api
    # The photo takes about two seconds to decode, turn and thumbnail.
    monkeypatch.setattr(media, "ANALYSIS_TIMEOUT_S", 0.5, raising=False)
    app = await api.create_app()
    user = await api.user_headers(app)
    data = bomb_png()
    att = await processed(api, user, data, filename="p.png", content_type="image/png", kind="photo")
    assert att["status"] == "rejected", att
    assert att["reason"] == "the file needs more time than processing allows"
    assert await media_job_attempts(api) == [("done", 1)]
    assert analysis_left_running() == []


async def test_a_child_that_exceeds_its_cpu_time_is_rejected_for_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RLIMIT_CPU ends the child (SIGXCPU): the file is rejected as one that needs more
    time, not retried as a crash."""
    src = tmp_path / "p.png"
    src.write_bytes(bomb_png())
    monkeypatch.setattr(media, "ANALYSIS_CPU_S", 1, raising=False)
    outcome = await media.run_analysis("photo", "image/png", src, tmp_path, False, None)
    assert outcome.ready is False
    assert outcome.reason == "the file needs more time than processing allows"
    assert analysis_left_running() == []


async def test_a_small_photo_is_still_ready_through_the_child(tmp_path: Path) -> None:
    src = tmp_path / "p.jpg"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(src, "JPEG")
    outcome = await media.run_analysis("photo", "image/jpeg", src, tmp_path, False, None)
    assert outcome.ready, outcome
    assert (outcome.width, outcome.height) == (64, 48)
    assert outcome.thumbnail is not None
    assert outcome.thumbnail.exists()
