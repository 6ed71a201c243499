"""Verify Tellback webhook deliveries (Standard Webhooks) in your backend.

    from tellback_sdk.webhooks import WebhookVerificationError, verify

    try:
        event = verify(request.body, request.headers, os.environ["TELLBACK_WEBHOOK_SECRET"])
    except WebhookVerificationError:
        return 400
    if event.type == "message.created" and not event.message.internal:
        ...

Pass the *raw* body bytes (not re-serialised JSON): the signature covers them. During
a secret rotation pass both secrets (``[new, old]``); a delivery signed with either is
accepted. Deliveries are at least once: de-duplicate on ``event.id`` (the
``webhook-id`` header, stable across retries).

Needs the ``standardwebhooks`` package (``pip install 'tellback-sdk[webhooks]'``); it
is imported only when ``verify`` is first called.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from msgspec import Struct

from tellback_sdk.errors import TellbackError
from tellback_sdk.types import Location, Message

__all__ = [
    "AgentConversation",
    "AgentMessage",
    "EndUser",
    "WebhookEvent",
    "WebhookVerificationError",
    "verify",
]

DEFAULT_TOLERANCE = 300  # seconds between the webhook-timestamp and now, either way
log = logging.getLogger("tellback_sdk.webhooks")


class WebhookVerificationError(TellbackError):
    """Missing/invalid headers, a timestamp outside the tolerance, or no valid signature:
    answer 4xx and do not act on the body."""


class EndUser(Struct, kw_only=True, frozen=True):
    id: str
    external_id: str | None = None
    name: str | None = None
    email: str | None = None
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)


class AgentMessage(Message, kw_only=True):
    """A message as agents see it: ``internal`` notes are never shown to the end user."""

    internal: bool = False


class AgentConversation(Struct, kw_only=True):
    """A conversation as agents see it (the webhook view)."""

    id: str
    app_id: str
    status: str
    priority: str | None = None
    subject: str | None = None
    category: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    assignee_id: str | None = None
    end_user: EndUser | None = None
    last_message: AgentMessage | None = None
    message_count: int = 0
    unread_count: int = 0
    location: Location | None = None
    created_at: dt.datetime
    updated_at: dt.datetime
    last_activity_at: dt.datetime | None = None


class WebhookEvent(Struct, kw_only=True, frozen=True):
    """A verified delivery. ``data`` is the raw object; ``conversation`` and ``message``
    are its typed parts when present (``conversation.created``, ``message.created``,
    ``conversation.updated``; a later type may carry neither)."""

    id: str
    type: str
    timestamp: dt.datetime | None
    data: dict[str, Any]
    conversation: AgentConversation | None = None
    message: AgentMessage | None = None


def _webhook_class() -> Any:
    try:
        from standardwebhooks.webhooks import Webhook  # noqa: PLC0415 (optional extra)
    except ImportError as exc:
        raise ImportError(
            "tellback_sdk.webhooks needs the 'standardwebhooks' package: "
            "pip install 'tellback-sdk[webhooks]'"
        ) from exc
    return Webhook


def _signatures(header: str) -> list[bytes]:
    out = []
    for part in header.split():
        version, _, value = part.partition(",")
        if version != "v1":
            continue
        try:
            out.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return out


def verify(
    payload: bytes | str,
    headers: Mapping[str, str],
    secret: str | Sequence[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> WebhookEvent:
    """Check a delivery's signature and age, then parse it.

    ``headers``: any mapping (names are matched case-insensitively); ``secret``: the
    endpoint's ``whsec_...`` secret, or several during a rotation. ``tolerance``: how many
    seconds the ``webhook-timestamp`` may differ from ``now`` (replay protection).
    Raises ``WebhookVerificationError``; ``ValueError`` for a malformed secret.
    """
    webhook = _webhook_class()
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    header = lowered.get("webhook-signature")
    if not (msg_id and stamp and header):
        raise WebhookVerificationError(
            "missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    try:
        timestamp = int(stamp.strip())
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not unix seconds") from None
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > current + tolerance:
        raise WebhookVerificationError("webhook-timestamp is in the future")
    body = payload.encode() if isinstance(payload, str) else bytes(payload)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookVerificationError("the body is not UTF-8 JSON") from None
    keys = [secret] if isinstance(secret, str) else list(secret)
    if not keys:
        raise ValueError("no webhook secret given")
    passed = _signatures(header)
    when = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    matched = False
    for key in keys:
        try:
            signer = webhook(key)
        except Exception as exc:  # the library's own errors for empty / bad base64 keys
            raise ValueError("not a webhook secret (expected whsec_<base64>)") from exc
        expected = base64.b64decode(signer.sign(msg_id, when, text).partition(",")[2])
        if any(hmac.compare_digest(expected, sig) for sig in passed):
            matched = True
            break
    if not matched:
        raise WebhookVerificationError("no signature matches the secret")
    return _parse(body, msg_id)


def _parse(body: bytes, msg_id: str) -> WebhookEvent:
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise WebhookVerificationError("the body is not JSON") from None
    if not isinstance(raw, dict):
        raise WebhookVerificationError("the body is not a JSON object")
    found = raw.get("data")
    data: dict[str, Any] = found if isinstance(found, dict) else {}
    type_ = str(raw.get("type") or "")
    conversation = message = None
    try:
        if isinstance(data.get("conversation"), dict):
            conversation = msgspec.convert(data["conversation"], AgentConversation, strict=False)
        if isinstance(data.get("message"), dict):
            message = msgspec.convert(data["message"], AgentMessage, strict=False)
    except msgspec.ValidationError as exc:
        log.warning("tellback: cannot read a %s webhook's data (%s); see .data", type_, exc)
    stamp = raw.get("timestamp")
    try:
        timestamp = dt.datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        timestamp = None
    return WebhookEvent(
        id=str(raw.get("id") or msg_id),
        type=type_,
        timestamp=timestamp,
        data=data,
        conversation=conversation,
        message=message,
    )
