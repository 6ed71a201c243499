"""Does a file's leading bytes match its declared content type?

An allowlist check for the types Tellback accepts, not general identification:
for each allowed type we know exactly which signatures are acceptable, and
text types (plain, JSON) are checked for being UTF-8 without NUL bytes, which
no magic-number library does. A script renamed to ``.jpg`` fails here.
"""

from __future__ import annotations

from collections.abc import Callable

HEAD_BYTES = 4096

_HEIF_BRANDS = {
    b"heic",
    b"heix",
    b"heim",
    b"heis",
    b"hevc",
    b"hevx",
    b"mif1",
    b"msf1",
    b"heif",
    b"avif",
}
_MP4_BRANDS = {
    b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"dash",
    b"M4V ", b"M4A ", b"f4v ", b"mmp4", b"3gp4", b"3gp5", b"3g2a", b"MSNV", b"NDAS", b"XAVC",
}  # fmt: skip
_QT_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


def _ftyp_brands(head: bytes) -> set[bytes]:
    if len(head) < 12 or head[4:8] != b"ftyp":
        return set()
    box_size = int.from_bytes(head[0:4], "big")
    end = min(len(head), box_size if box_size >= 16 else 16)
    brands = {head[8:12]}
    brands.update(head[i : i + 4] for i in range(16, end - 3, 4))
    return brands


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character may be cut at the end of the sample.
        return exc.start >= len(head) - 3
    return True


def _is_json(head: bytes) -> bool:
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return _is_text(head) and stripped[:1] in {b"{", b"["}


_CHECKS: dict[str, Callable[[bytes], bool]] = {
    "image/jpeg": lambda h: h[:3] == b"\xff\xd8\xff",
    "image/png": lambda h: h[:8] == b"\x89PNG\r\n\x1a\n",
    "image/gif": lambda h: h[:6] in {b"GIF87a", b"GIF89a"},
    "image/webp": lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP",
    "image/heic": lambda h: bool(_ftyp_brands(h) & _HEIF_BRANDS),
    "image/heif": lambda h: bool(_ftyp_brands(h) & _HEIF_BRANDS),
    "video/mp4": lambda h: bool(_ftyp_brands(h) & _MP4_BRANDS),
    "video/quicktime": lambda h: (
        b"qt  " in _ftyp_brands(h) or bool(_ftyp_brands(h) & _MP4_BRANDS) or h[4:8] in _QT_ATOMS
    ),
    "application/pdf": lambda h: h[:5] == b"%PDF-",
    "application/zip": lambda h: h[:4] in {b"PK\x03\x04", b"PK\x05\x06"},
    "application/json": _is_json,
    "text/plain": _is_text,
}


def supported(content_type: str) -> bool:
    return content_type in _CHECKS


def matches(content_type: str, head: bytes) -> bool:
    check = _CHECKS.get(content_type)
    return check is not None and len(head) > 0 and check(head)
