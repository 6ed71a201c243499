"""`tellback dev push-sink`'s output for refused pushes: it says why, not only that."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pyfcm import FCMNotification
from requests.adapters import HTTPAdapter

from tellback_server.cli.dev import _Printer, format_apns
from tellback_server.dev.apns_fake import ApnsNotification
from tellback_server.dev.fcm_fake import INVALID_REGISTRATION_TEXT, FcmFake, FcmMessage

PROJECT = "tellback-sink-test"


@pytest.fixture
async def sink() -> AsyncIterator[tuple[FcmFake, _Printer, list[str]]]:
    """An FCM fake whose every answer goes through the sink's printer into a list."""
    lines: list[str] = []
    printer = _Printer(as_json=False, quiet=False)
    printer.emit = lines.append
    async with FcmFake(on_request=printer.fcm) as fake:
        yield fake, printer, lines


async def _send_bad_token(fake: FcmFake, tmp_path: Path) -> FcmMessage:
    account = tmp_path / "service-account.json"
    account.write_text(json.dumps(fake.service_account(PROJECT)))
    fcm = FCMNotification(service_account_file=str(account), adapter=HTTPAdapter(max_retries=0))
    fcm.FCM_END_POINT_BASE = fake.pyfcm_endpoint_base

    def post() -> int:
        payload = fcm.parse_payload(fcm_token="not a token!", notification_title="Hi")
        answer = fcm.requests_session.post(fcm.fcm_end_point, data=payload, timeout=10)
        return int(answer.status_code)

    assert await asyncio.to_thread(post) == 400
    return fake.attempts[-1]


async def test_fcm_refusal_records_and_prints_the_fakes_message(
    sink: tuple[FcmFake, _Printer, list[str]], tmp_path: Path
) -> None:
    fake, _printer, lines = sink
    record = await _send_bad_token(fake, tmp_path)

    assert record.error_code == "INVALID_ARGUMENT"
    assert record.error_message == INVALID_REGISTRATION_TEXT
    text = "\n".join(lines)
    assert "FCM   400 INVALID_ARGUMENT" in text
    assert f"error:    {INVALID_REGISTRATION_TEXT}" in text
    # The hint points at a reason that is now on screen.
    assert "hint: FCM would reject this message" in text
    assert text.index("error:") < text.index("hint:")


async def test_fcm_refusal_in_json_carries_the_message(
    sink: tuple[FcmFake, _Printer, list[str]], tmp_path: Path
) -> None:
    fake, printer, lines = sink
    printer.as_json = True
    await _send_bad_token(fake, tmp_path)

    (line,) = lines
    shown = json.loads(line)
    assert shown["status"] == 400
    assert shown["error"] == "INVALID_ARGUMENT"
    assert shown["error_message"] == INVALID_REGISTRATION_TEXT


def test_apns_refusal_prints_its_reason() -> None:
    record = ApnsNotification(
        token="zz",
        headers={"apns-topic": "com.example.tellback"},
        payload={"aps": {"alert": "Hi"}},
        body=b'{"aps": {"alert": "Hi"}}',
        apns_id="id",
        status=400,
        reason="BadDeviceToken",
        team_id=None,
        key_id=None,
        received_at=0.0,
        received_wall=0.0,
        connection_id=1,
        stream_id=1,
    )
    lines = format_apns(record)
    assert "APNs  400 BadDeviceToken  token zz" in lines[0]
    assert any("hint: device tokens are 64+ hex digits" in line for line in lines)
