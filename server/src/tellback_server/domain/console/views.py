"""What the console's templates show, shaped from the agent API's wire types.

Everything here returns plain values; the templates escape all of it (Jinja
autoescaping). Feedback is untrusted input: nothing a user sent becomes markup,
a link target or a style. URLs placed in ``src``/``href`` are only the server's
own signed storage URLs, and only when they are http(s).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode
from uuid import UUID

from tellback_server.domain.attachments.schemas import AttachmentOut
from tellback_server.domain.conversations.schemas import Location

STATUSES = ("open", "pending", "solved", "closed")
PRIORITIES = ("low", "normal", "high", "urgent")
# Only raster types a browser decodes inertly are shown inline. SVG never is (the server
# does not accept it as a photo today; if it ever did, it would be a download here).
INLINE_IMAGES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
INLINE_VIDEOS = frozenset({"video/mp4", "video/quicktime"})

Display = Literal["image", "video", "download", "none"]


def http_url(url: str | None) -> str | None:
    """The URL if it is http(s); anything else (``javascript:``, ``data:``) is dropped."""
    if url and url.lower().startswith(("https://", "http://")):
        return url
    return None


def filesize(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def when(value: dt.datetime | None) -> str:
    """A time in UTC, to the minute; one without an offset is taken as UTC. A time with
    no UTC equivalent (stored before the API refused them) is shown as it was given."""
    if value is None:
        return ""
    try:
        utc = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    except OverflowError:
        return value.isoformat()
    return utc.strftime("%Y-%m-%d %H:%M UTC")


def short_id(value: UUID | str | None) -> str:
    return str(value)[:8] if value else ""


def scalar(value: Any) -> str:
    """A context or custom-field value as text (nested values as compact JSON)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


@dataclass(frozen=True, slots=True)
class AttachmentView:
    id: UUID
    kind: str
    filename: str
    content_type: str
    size: str
    status: str
    reason: str | None
    display: Display
    url: str | None
    thumbnail_url: str | None
    width: int | None
    height: int | None
    duration_s: float | None


def attachment_view(att: AttachmentOut) -> AttachmentView:
    url, thumb = http_url(att.url), http_url(att.thumbnail_url)
    display: Display = "none"
    if url is not None:
        display = "download"
        if att.kind == "photo" and att.content_type in INLINE_IMAGES:
            display = "image"
        elif att.kind == "video" and att.content_type in INLINE_VIDEOS:
            display = "video"
    return AttachmentView(
        id=att.id,
        kind=att.kind,
        filename=att.filename,
        content_type=att.content_type,
        size=filesize(att.size),
        status=att.status,
        reason=att.reason,
        display=display,
        url=url,
        thumbnail_url=thumb,
        width=att.width,
        height=att.height,
        duration_s=att.duration_s,
    )


def map_url(location: Location) -> str:
    """OpenStreetMap at the point; built from the two numbers only."""
    lat, lon = f"{location.latitude:.6f}", f"{location.longitude:.6f}"
    return f"https://www.openstreetmap.org/?mlat={lat}&mlon={lon}#map=17/{lat}/{lon}"


def context_sections(context: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """``{"device": {"model": ...}, ...}`` as titled lists of (key, text) rows."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for name in sorted(context):
        value = context[name]
        if isinstance(value, dict):
            rows = [(str(k), scalar(v)) for k, v in sorted(value.items(), key=lambda kv: kv[0])]
        else:
            rows = [("", scalar(value))]
        if rows:
            sections.append((str(name), rows))
    return sections


@dataclass(frozen=True, slots=True)
class InboxFilters:
    app_id: UUID | None = None
    status: str | None = None
    tag: str | None = None
    q: str | None = None
    mine: bool = False
    cursor: str | None = None

    @classmethod
    def parse(cls, query: dict[str, str]) -> InboxFilters:
        """Lenient: an unknown app or status is no filter, not an error page."""
        app_id = None
        try:
            app_id = UUID(query.get("app", "").strip()) if query.get("app") else None
        except ValueError:
            app_id = None
        status = query.get("status") if query.get("status") in STATUSES else None
        tag = (query.get("tag") or "").strip()[:50] or None
        q = (query.get("q") or "").strip()[:200] or None
        cursor = (query.get("cursor") or "").strip()[:500] or None
        return cls(app_id, status, tag, q, query.get("mine") == "1", cursor)

    def query(self, *, cursor: str | None = None) -> str:
        params = {
            "app": str(self.app_id) if self.app_id else "",
            "status": self.status or "",
            "tag": self.tag or "",
            "q": self.q or "",
            "mine": "1" if self.mine else "",
            "cursor": cursor or "",
        }
        return urlencode({k: v for k, v in params.items() if v})
