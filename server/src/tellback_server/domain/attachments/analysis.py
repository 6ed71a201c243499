"""The analysis of one uploaded file: pure functions of a path, run in a child process
(see ``media.run_analysis``) so that memory, CPU time and wall time are bounded and
freed with the process. It imports Pillow, pillow-heif and PyAV and nothing of the
server, so the fork server that starts these children preloads little.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import pillow_heif
from PIL import Image, ImageOps

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


# What a child says when it ran out of the memory it is allowed (see ``media``).
NEEDS_MEMORY = "the file needs more memory than processing allows"


def child_main(argv: list[str]) -> None:
    """A child process's whole life (``python -m`` this module, one JSON argument):
    bound itself, analyse one file, print the small ``Outcome`` as JSON (the thumbnail
    and the rewritten file are files in the workdir), exit. Exceeding the CPU time limit
    ends it with SIGXCPU (then SIGKILL); running out of address space makes the decoder's
    allocation fail (``MemoryError``)."""
    job = json.loads(argv[0])
    memory = int(job["memory_bytes"])
    cpu = int(job["cpu_s"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    try:
        outcome = analyse(
            job["kind"],
            job["content_type"],
            Path(job["src"]),
            Path(job["workdir"]),
            bool(job["keep_location"]),
            job["sha256"],
        )
    except MemoryError:
        outcome = Outcome(False, NEEDS_MEMORY)
    result = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(outcome).items()}
    sys.stdout.write(json.dumps(result) + "\n")


def outcome_from_json(text: str) -> Outcome:
    data = json.loads(text)
    for key in ("thumbnail", "rewritten"):
        if data.get(key) is not None:
            data[key] = Path(data[key])
    return Outcome(**data)


if __name__ == "__main__":
    child_main(sys.argv[1:])
