"""What reaches a phone: APNs and FCM payloads built from one notification.

Pure functions, shared with the SDK spec's test vectors (sdk-spec/push.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import regex

SNIPPET_CHARS = 178
APNS_MAX_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Notification:
    type: str  # message.created | conversation.created
    conversation_id: str
    message_id: str
    title: str
    body: str
    badge: int
    has_image: bool = False


def snippet(text: str | None, limit: int = SNIPPET_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis: between two
    grapheme clusters, never inside one (a flag, a family emoji, a letter and its
    accent), which the lock screen would show broken."""
    flat = " ".join((text or "").split())
    if len(flat) <= limit:
        return flat
    end = 0
    for cluster in _GRAPHEME.finditer(flat, 0, limit):  # (clusters starting before the cut)
        if cluster.end() > limit - 1:
            break
        end = cluster.end()
    return flat[:end].rstrip() + "…"


_GRAPHEME = regex.compile(r"\X")


def custom_keys(n: Notification) -> dict[str, str]:
    return {"type": n.type, "conversation_id": n.conversation_id, "message_id": n.message_id}


def apns_payload(n: Notification) -> dict[str, Any]:
    aps: dict[str, Any] = {
        "alert": {"title": n.title, "body": n.body},
        "badge": n.badge,
        "sound": "default",
        "thread-id": n.conversation_id,
    }
    if n.has_image:
        aps["mutable-content"] = 1
    return {"aps": aps, "tellback": custom_keys(n)}


def fcm_message(token: str, n: Notification) -> dict[str, Any]:
    """The HTTP v1 `message` object (everything in `data` is a string, as FCM requires)."""
    return {
        "token": token,
        "notification": {"title": n.title, "body": n.body},
        "data": {**custom_keys(n), "badge": str(n.badge)},
        "android": {
            "priority": "high",
            "collapse_key": n.conversation_id,
            "notification": {"tag": n.conversation_id, "notification_count": n.badge},
        },
    }
