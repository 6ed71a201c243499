"""Turn a received push into a typed event for deep linking (sdk-spec/push.md).

APNs payloads carry ``{"aps": {..., "badge": n}, "tellback": {"type",
"conversation_id", "message_id"}}``; FCM ``data`` carries the same three keys plus
``badge``, all strings. Anything else is not a Tellback push: ``parse_push`` returns
None so the app can hand it to its own handlers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PushEvent", "parse_push"]


@dataclass(frozen=True, slots=True)
class PushEvent:
    type: str  # message.created | conversation.created | a newer type: treat as opaque
    conversation_id: str
    message_id: str | None
    badge: int | None = None
    title: str | None = None
    body: str | None = None


def _badge(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _alert(aps: Mapping[str, Any]) -> tuple[str | None, str | None]:
    alert = aps.get("alert")
    if isinstance(alert, Mapping):
        title, body = alert.get("title"), alert.get("body")
        return (title if isinstance(title, str) else None, body if isinstance(body, str) else None)
    return None, alert if isinstance(alert, str) else None


def parse_push(payload: Mapping[str, Any]) -> PushEvent | None:
    """An APNs ``userInfo`` dict, an FCM ``data`` dict, or a whole FCM message (with
    ``data``/``notification``) -> ``PushEvent``; None if it is not Tellback's."""
    custom = payload.get("tellback")
    if isinstance(custom, Mapping):  # APNs
        aps = payload.get("aps")
        aps = aps if isinstance(aps, Mapping) else {}
        title, body = _alert(aps)
        return _event(custom, _badge(aps.get("badge")), title, body)
    data = payload.get("data")
    if isinstance(data, Mapping):  # a whole FCM message
        note = payload.get("notification")
        note = note if isinstance(note, Mapping) else {}
        return _event(data, _badge(data.get("badge")), note.get("title"), note.get("body"))
    return _event(payload, _badge(payload.get("badge")), None, None)  # FCM data only


def _event(keys: Mapping[str, Any], badge: int | None, title: Any, body: Any) -> PushEvent | None:
    kind, conversation_id = keys.get("type"), keys.get("conversation_id")
    if not isinstance(kind, str) or not isinstance(conversation_id, str) or not conversation_id:
        return None
    message_id = keys.get("message_id")
    return PushEvent(
        type=kind,
        conversation_id=conversation_id,
        message_id=message_id if isinstance(message_id, str) and message_id else None,
        badge=badge,
        title=title if isinstance(title, str) else None,
        body=body if isinstance(body, str) else None,
    )
