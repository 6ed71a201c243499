"""Push: registration against the server, and parsing the payloads the server builds."""

from __future__ import annotations

from pathlib import Path

from tellback_sdk import AsyncClient, parse_push
from tellback_server.domain.push.payloads import Notification, apns_payload, fcm_message
from tests.sdk.conftest import BASE, InProcess

NOTE = Notification(
    type="message.created",
    conversation_id="c-1",
    message_id="m-1",
    title="Ada",
    body="Fixed in 2.3.2",
    badge=3,
)


def test_apns_payload() -> None:
    event = parse_push(apns_payload(NOTE))
    assert event is not None
    assert (event.type, event.conversation_id, event.message_id, event.badge) == (
        "message.created",
        "c-1",
        "m-1",
        3,
    )
    assert (event.title, event.body) == ("Ada", "Fixed in 2.3.2")


def test_fcm_data_and_whole_message() -> None:
    message = fcm_message("token", NOTE)
    for payload in (message, message["data"]):
        event = parse_push(payload)
        assert event is not None
        assert (event.conversation_id, event.message_id, event.badge) == ("c-1", "m-1", 3)


def test_foreign_and_future_payloads() -> None:
    assert parse_push({"aps": {"alert": "hi"}}) is None
    assert parse_push({"type": "x"}) is None
    event = parse_push({"type": "conversation.merged", "conversation_id": "c", "badge": "x"})
    assert event is not None
    assert (event.type, event.badge) == ("conversation.merged", None)


async def test_register_and_unregister(server: InProcess, tmp_path: Path) -> None:
    async with AsyncClient(
        BASE, server.app.app_key, data_dir=tmp_path, transport=server.asgi
    ) as tb:
        dev = await tb.devices.register("apns", "ab" * 32, apns_environment="sandbox")
        assert (dev.platform, dev.push_provider, dev.apns_environment) == (
            "ios",
            "apns",
            "sandbox",
        )
        assert dev.push_token_suffix
        assert dev.active
        dev = await tb.devices.register("fcm", "fcm-token-123456", app_version="2.0")
        assert (dev.platform, dev.push_provider, dev.app_version) == ("android", "fcm", "2.0")
        await tb.devices.unregister()
