"""The APNs and FCM fakes, driven by the REAL aioapns and pyfcm client code.

These tests pin down both what the fakes do (Apple's / Google's documented
answers) and how the client libraries surface those answers -- including their
traps: aioapns waits forever on an error without a body and stops seeing error
bodies once 64 KiB of them arrived on one connection; pyfcm sleeps on
Retry-After and retries 502/503 inside the call unless its adapter says not to.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aioapns import APNs, NotificationRequest, PushType
from aioapns.common import NotificationResult
from aioapns.connection import APNsProductionClientProtocol
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.oauth2 import service_account
from pyfcm import FCMNotification
from pyfcm.errors import (
    AuthenticationError,
    FCMNotRegisteredError,
    FCMSenderIdMismatchError,
    FCMServerError,
    InvalidDataError,
)
from requests.adapters import HTTPAdapter

from tellback_server.dev.apns_fake import ApnsFake
from tellback_server.dev.fcm_fake import FcmFake

TEAM_ID = "TEAMID1234"
KEY_ID = "KEYID12345"
TOPIC = "com.example.tellback"
PROJECT = "tellback-test"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


# --------------------------------------------------------------------------- APNs


@pytest.fixture
async def apns_fake() -> AsyncIterator[ApnsFake]:
    fake = ApnsFake(topics=[TOPIC])
    async with fake:
        yield fake


@pytest.fixture(scope="module")
def apns_key() -> tuple[str, str]:
    return ApnsFake.generate_key()


@pytest.fixture
async def make_apns(
    apns_fake: ApnsFake, apns_key: tuple[str, str]
) -> AsyncIterator[Callable[..., APNs]]:
    """Build aioapns clients pointed at the fake (key registered); closed at teardown."""
    apns_fake.add_key(TEAM_ID, KEY_ID, apns_key[1])
    clients: list[APNs] = []

    def make(
        *, key: str | None = None, key_id: str = KEY_ID, team_id: str = TEAM_ID, **kw: Any
    ) -> APNs:
        client = APNs(
            key=key or apns_key[0],
            key_id=key_id,
            team_id=team_id,
            topic=TOPIC,
            ssl_context=apns_fake.client_ssl_context(),
            max_connection_attempts=1,
            **kw,
        )
        # aioapns reads host/port from class attributes of its protocol class.
        class_ = type(
            "FakeApnsProtocol",
            (APNsProductionClientProtocol,),
            {"APNS_SERVER": "127.0.0.1", "APNS_PORT": apns_fake.port},
        )
        client.pool.protocol_class = class_
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.pool.close()
    await asyncio.sleep(0.05)


def _request(token: str, **kw: Any) -> NotificationRequest:
    message = kw.pop("message", {"aps": {"alert": {"title": "New reply", "body": "Hi"}}})
    return NotificationRequest(device_token=token, message=message, **kw)


async def test_apns_send_is_recorded_with_exact_headers_and_payload(
    apns_fake: ApnsFake, make_apns: Callable[..., APNs]
) -> None:
    client = make_apns()
    token = apns_fake.make_token()
    payload = {
        "aps": {"alert": {"title": "New reply", "body": "We fixed it"}, "badge": 3},
        "ticket_id": "t-42",
    }
    before = int(time.time())
    request = NotificationRequest(
        device_token=token,
        message=payload,
        time_to_live=3600,
        priority=10,
        collapse_key="ticket-42",
        push_type=PushType.ALERT,
    )
    result = await client.send_notification(request)

    assert result.status == "200"
    assert result.description is None
    assert result.notification_id == request.notification_id
    [got] = await apns_fake.wait_for(1, timeout=2)
    assert got.accepted
    assert got.token == token
    assert got.payload == payload
    assert got.apns_id == request.notification_id  # echoed: aioapns matches on it
    assert got.team_id == TEAM_ID
    assert got.key_id == KEY_ID
    headers = got.headers
    assert headers[":method"] == "POST"
    assert headers[":path"] == f"/3/device/{token}"
    assert headers["apns-topic"] == TOPIC
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-collapse-id"] == "ticket-42"
    assert headers["apns-priority"] == "10"
    assert before + 3600 <= int(headers["apns-expiration"]) <= int(time.time()) + 3600
    assert headers["authorization"].startswith("bearer ")
    assert got.received_at <= time.monotonic()
    assert abs(got.received_wall - time.time()) < 5


APNS_ERRORS = [
    (400, "BadDeviceToken"),
    (400, "DeviceTokenNotForTopic"),
    (400, "BadTopic"),
    (400, "TopicDisallowed"),
    (400, "MissingTopic"),
    (400, "BadCollapseId"),
    (400, "BadExpirationDate"),
    (400, "PayloadEmpty"),
    (400, "BadPriority"),
    (400, "InvalidPushType"),
    (403, "InvalidProviderToken"),
    (403, "ExpiredProviderToken"),
    (403, "MissingProviderToken"),
    (410, "Unregistered"),
    (413, "PayloadTooLarge"),
    (429, "TooManyRequests"),
    (500, "InternalServerError"),
    (503, "ServiceUnavailable"),
]


@pytest.mark.parametrize(("status", "reason"), APNS_ERRORS)
async def test_apns_injected_errors_surface_as_aioapns_results(
    apns_fake: ApnsFake, make_apns: Callable[..., APNs], status: int, reason: str
) -> None:
    client = make_apns()
    token = apns_fake.make_token()
    apns_fake.fail_next(status, reason)

    result = await asyncio.wait_for(client.send_notification(_request(token)), 5)

    assert result.status == str(status)
    assert result.description == reason
    assert not result.is_successful
    if status == 410:
        assert isinstance(result.timestamp, int)
        assert abs(result.timestamp - time.time() * 1000) < 60_000
    else:
        assert result.timestamp is None
    assert apns_fake.received == []
    assert [(a.status, a.reason) for a in apns_fake.attempts] == [(status, reason)]
    # Only the next one failed.
    again = await asyncio.wait_for(client.send_notification(_request(token)), 5)
    assert again.status == "200"


async def test_apns_real_checks_through_aioapns(
    apns_fake: ApnsFake, make_apns: Callable[..., APNs]
) -> None:
    client = make_apns()
    token = apns_fake.make_token()

    async def send(**kw: Any) -> NotificationResult:
        return await asyncio.wait_for(client.send_notification(_request(**kw)), 5)

    bad = await send(token="not-a-token")
    assert (bad.status, bad.description) == ("400", "BadDeviceToken")
    short = await send(token="ab" * 16)
    assert (short.status, short.description) == ("400", "BadDeviceToken")
    other_topic = await send(token=token, apns_topic="com.other.app")
    assert (other_topic.status, other_topic.description) == ("400", "DeviceTokenNotForTopic")
    large = await send(token=token, message={"aps": {"alert": "x" * 4100}})
    assert (large.status, large.description) == ("413", "PayloadTooLarge")
    voip = await send(token=token, push_type=PushType.VOIP, apns_topic=f"{TOPIC}.voip")
    assert voip.status == "200"
    voip_wrong = await send(token=token, push_type=PushType.VOIP)
    assert (voip_wrong.status, voip_wrong.description) == ("400", "DeviceTokenNotForTopic")

    apns_fake.unregister(token, timestamp_ms=1_700_000_000_123)
    gone = await send(token=token)
    assert (gone.status, gone.description, gone.timestamp) == (
        "410",
        "Unregistered",
        1_700_000_000_123,
    )
    apns_fake.reregister(token)
    assert (await send(token=token)).status == "200"
    assert [a.status for a in apns_fake.attempts] == [400, 400, 400, 413, 200, 400, 410, 200]
    assert apns_fake.received_count == 2


async def test_apns_wrong_key_is_invalid_provider_token(
    apns_fake: ApnsFake, make_apns: Callable[..., APNs]
) -> None:
    other_private, _ = ApnsFake.generate_key()
    # Same key id, signed by a key the fake does not know.
    forged = make_apns(key=other_private)
    result = await asyncio.wait_for(forged.send_notification(_request(apns_fake.make_token())), 5)
    assert (result.status, result.description) == ("403", "InvalidProviderToken")
    # Right key, wrong team id.
    wrong_team = make_apns(team_id="OTHERTEAM1")
    result = await asyncio.wait_for(
        wrong_team.send_notification(_request(apns_fake.make_token())), 5
    )
    assert (result.status, result.description) == ("403", "InvalidProviderToken")
    # Unknown key id.
    unknown = make_apns(key_id="UNKNOWNKEY")
    result = await asyncio.wait_for(unknown.send_notification(_request(apns_fake.make_token())), 5)
    assert (result.status, result.description) == ("403", "InvalidProviderToken")
    # The key is revoked.
    good = make_apns()
    assert (await good.send_notification(_request(apns_fake.make_token()))).status == "200"
    apns_fake.remove_key(KEY_ID)
    result = await asyncio.wait_for(good.send_notification(_request(apns_fake.make_token())), 5)
    assert (result.status, result.description) == ("403", "InvalidProviderToken")


async def test_apns_error_without_body_hangs_aioapns(
    apns_fake: ApnsFake, make_apns: Callable[..., APNs]
) -> None:
    """aioapns resolves an error only from its JSON body: no body -> waits forever.

    This is why the server must wrap every send in a timeout.
    """
    client = make_apns()
    apns_fake.fail_next_without_body(500)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.send_notification(_request(apns_fake.make_token())), 0.5)

    [answered] = apns_fake.attempts
    assert answered.status == 500  # the fake did answer: headers + END_STREAM, no DATA
    # The connection itself is still usable.
    ok = await asyncio.wait_for(client.send_notification(_request(apns_fake.make_token())), 5)
    assert ok.status == "200"


async def test_apns_hang_mode_never_answers(
    apns_fake: ApnsFake, make_apns: Callable[..., APNs]
) -> None:
    client = make_apns()
    token = apns_fake.make_token()
    apns_fake.hang_next(token=token)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.send_notification(_request(token)), 0.5)
    assert [a.status for a in await apns_fake.wait_for_attempts(1)] == [0]
    assert (await client.send_notification(_request(token))).status == "200"


async def test_apns_fail_next_count_and_token_filter(
    apns_fake: ApnsFake, make_apns: Callable[..., APNs]
) -> None:
    client = make_apns()
    target, bystander = apns_fake.make_token(), apns_fake.make_token()
    apns_fake.fail_next(503, count=2, token=target)

    results = [
        await client.send_notification(_request(token))
        for token in (bystander, target, bystander, target, target)
    ]

    assert [r.status for r in results] == ["200", "503", "200", "503", "200"]
    assert results[1].description == "ServiceUnavailable"
    assert apns_fake.received_count == 3


async def test_apns_many_concurrent_streams_and_connections(
    apns_fake: ApnsFake, make_apns: Callable[..., APNs]
) -> None:
    first, second = make_apns(), make_apns()
    tokens = [apns_fake.make_token() for _ in range(50)]
    requests = [
        _request(tokens[i % 50], message={"aps": {"alert": f"m{i}"}, "i": i}) for i in range(2400)
    ]

    results = await asyncio.wait_for(
        asyncio.gather(
            *(
                (first if i % 3 else second).send_notification(request)
                for i, request in enumerate(requests)
            )
        ),
        60,
    )

    assert {r.status for r in results} == {"200"}
    received = await apns_fake.wait_for(2400, timeout=5)
    assert sorted(r.payload["i"] for r in received) == list(range(2400))
    # One connection per client: aioapns picks a connection before taking one of its
    # streams, so 1,600 sends started together all queue on `first`'s connection (the
    # fake allows 1,000 concurrent streams) instead of opening a second one.
    by_connection = Counter(r.connection_id for r in received)
    assert sorted(by_connection.values()) == [800, 1600]
    assert len({(r.connection_id, r.stream_id) for r in received}) == 2400


async def test_apns_wait_for_times_out_with_a_useful_message(apns_fake: ApnsFake) -> None:
    with pytest.raises(TimeoutError, match=r"waited 0.1s for 1 accepted notifications, got 0"):
        await apns_fake.wait_for(1, timeout=0.1)


class _AckingProtocol(APNsProductionClientProtocol):
    """aioapns protocol that returns HTTP/2 flow-control credit for response bodies."""

    def on_data_received(self, raw_data: bytes, stream_id: int) -> None:
        self.conn.acknowledge_received_data(len(raw_data), stream_id)
        super().on_data_received(raw_data, stream_id)


async def test_apns_aioapns_never_returns_flow_control_credit(
    apns_fake: ApnsFake, make_apns: Callable[..., APNs]
) -> None:
    """aioapns never sends WINDOW_UPDATE for response DATA: after ~64 KiB of error
    bodies on one connection the server may not send more, so every later error on
    that connection hangs (200s, which have no body, still work). Acknowledging the
    data (as _AckingProtocol does) fixes it."""
    token = apns_fake.make_token()
    apns_fake.unregister(token)  # {"reason":"Unregistered","timestamp":...}: 49 bytes each
    n = 1500  # 1500 * 49 > 65,535

    async def send_all(client: APNs, within: float) -> tuple[int, int]:
        async def one() -> bool:
            try:
                await asyncio.wait_for(client.send_notification(_request(token)), within)
            except TimeoutError:
                return False
            return True

        done = await asyncio.gather(*(one() for _ in range(n)))
        return sum(done), n - sum(done)

    stock = make_apns(err_func=_quiet)
    answered, stuck = await send_all(stock, 3)
    assert stuck > 0
    assert answered < 65_535 // 49 + 1
    # A success (no body) on the stalled connection still completes.
    fresh = apns_fake.make_token()
    assert (await asyncio.wait_for(stock.send_notification(_request(fresh)), 3)).status == "200"

    fixed = make_apns(err_func=_quiet)
    apns_fake.configure_client(fixed)  # keeps the client's base class...
    fixed.pool.protocol_class = apns_fake.client_protocol_class(_AckingProtocol)  # ...or not
    assert await send_all(fixed, 20) == (n, 0)


async def _quiet(_request: NotificationRequest, _result: NotificationResult) -> None:
    """aioapns logs every failed send at ERROR unless given an err_func."""


# -- the same checks with a raw HTTP/2 client (what aioapns cannot produce)


@pytest.fixture
async def h2_client(apns_fake: ApnsFake) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        http2=True,
        verify=apns_fake.client_ssl_context(),
        base_url=f"https://127.0.0.1:{apns_fake.port}",
    ) as client:
        yield client


def _provider_token(private_pem: str, *, iat: int | None = None, kid: str = KEY_ID) -> str:
    claims = {"iss": TEAM_ID, "iat": int(time.time()) if iat is None else iat}
    token = jwt.encode(claims, private_pem, algorithm="ES256", headers={"kid": kid})
    return f"bearer {token}"


async def test_apns_header_and_payload_checks_over_raw_http2(
    apns_fake: ApnsFake, apns_key: tuple[str, str], h2_client: httpx.AsyncClient
) -> None:
    apns_fake.add_key(TEAM_ID, KEY_ID, apns_key[1])
    token = apns_fake.make_token()
    good = {"authorization": _provider_token(apns_key[0]), "apns-topic": TOPIC}
    body = json.dumps({"aps": {"alert": "hi"}}).encode()

    async def post(
        headers: dict[str, str], content: bytes = body, path: str = f"/3/device/{token}"
    ) -> tuple[int, dict[str, Any], httpx.Response]:
        response = await h2_client.post(path, headers=headers, content=content)
        assert response.http_version == "HTTP/2"
        assert response.headers["apns-id"]
        return response.status_code, response.json() if response.content else {}, response

    cases: list[tuple[dict[str, str], bytes, int, str]] = [
        ({"apns-topic": TOPIC}, body, 403, "MissingProviderToken"),
        ({**good, "authorization": "bearer not.a.jwt"}, body, 403, "InvalidProviderToken"),
        (
            {**good, "authorization": _provider_token(apns_key[0], iat=int(time.time()) - 3601)},
            body,
            403,
            "ExpiredProviderToken",
        ),
        ({"authorization": good["authorization"]}, body, 400, "MissingTopic"),
        ({**good, "apns-topic": "com example"}, body, 400, "BadTopic"),
        ({**good, "apns-push-type": "shout"}, body, 400, "InvalidPushType"),
        ({**good, "apns-priority": "7"}, body, 400, "BadPriority"),
        ({**good, "apns-expiration": "tomorrow"}, body, 400, "BadExpirationDate"),
        ({**good, "apns-collapse-id": "c" * 65}, body, 400, "BadCollapseId"),
        ({**good, "apns-id": "not-a-uuid"}, body, 400, "BadMessageId"),
        (good, b"", 400, "PayloadEmpty"),
        (good, b"{not json", 400, "BadPayload"),
        (good, b"x" * 4097, 413, "PayloadTooLarge"),
    ]
    for headers, content, status, reason in cases:
        got_status, got_body, _ = await post(headers, content)
        assert (got_status, got_body.get("reason")) == (status, reason), (headers, content[:20])

    status, error, _ = await post(good, path="/3/device/")
    assert (status, error["reason"]) == (400, "MissingDeviceToken")
    status, error, _ = await post(good, path="/2/device/abc")
    assert (status, error["reason"]) == (404, "BadPath")
    response = await h2_client.get(f"/3/device/{token}", headers=good)
    assert (response.status_code, response.json()["reason"]) == (405, "MethodNotAllowed")

    apns_id = "8B6F2C1E-3E1A-4C7B-9F11-0123456789AB"
    status, _, response = await post({**good, "apns-id": apns_id})
    assert status == 200
    assert response.headers["apns-id"] == apns_id
    assert response.content == b""

    apns_fake.fail_next(429, count=1, retry_after=30)
    status, error, response = await post(good)
    assert (status, error, response.headers["retry-after"]) == (
        429,
        {"reason": "TooManyRequests"},
        "30",
    )


async def test_apns_fake_speaks_h2_alpn_and_trusts_only_its_ca(apns_fake: ApnsFake) -> None:
    context = apns_fake.client_ssl_context()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", apns_fake.port, ssl=context, server_hostname="localhost"
    )
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object.selected_alpn_protocol() == "h2"
    settings = await reader.read(9)  # the server speaks first: a SETTINGS frame
    assert settings[3] == 0x4
    writer.transport.abort()

    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection("127.0.0.1", apns_fake.port, ssl=ssl.create_default_context())


async def test_apns_fake_binds_loopback_only_and_stops(apns_fake: ApnsFake) -> None:
    port = apns_fake.port
    assert apns_fake.running
    await apns_fake.stop()
    assert not apns_fake.running
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


# --------------------------------------------------------------------------- FCM


@pytest.fixture
async def fcm_fake() -> AsyncIterator[FcmFake]:
    async with FcmFake() as fake:
        yield fake


@pytest.fixture
def account_file(fcm_fake: FcmFake, tmp_path: Path) -> Path:
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(fcm_fake.service_account(PROJECT)))
    return path


def _pyfcm(fake: FcmFake, account: Path, *, retries: bool = False) -> Any:
    """pyfcm pointed at the fake; retries off (pyfcm's default adapter retries 502/503)."""
    fcm = FCMNotification(
        service_account_file=str(account),
        project_id=PROJECT,
        adapter=None if retries else HTTPAdapter(max_retries=0),
    )
    fcm.FCM_END_POINT_BASE = fake.pyfcm_endpoint_base  # read when fcm_end_point is first built
    return fcm


def _raw_post(fcm: Any, **kw: Any) -> Any:
    """What the server does: POST pyfcm's payload through pyfcm's (authorised) session.

    Run it in a thread: even reading ``requests_session`` may fetch an OAuth token.
    """
    return fcm.requests_session.post(fcm.fcm_end_point, data=fcm.parse_payload(**kw), timeout=10)


async def _notify(fcm: Any, **kw: Any) -> Any:
    """pyfcm is synchronous (requests); the fake runs in this loop, so call it in a thread."""
    return await asyncio.to_thread(fcm.notify, **kw)


async def test_fcm_notify_is_recorded(fcm_fake: FcmFake, account_file: Path) -> None:
    fcm = _pyfcm(fcm_fake, account_file)
    token = fcm_fake.make_token()

    result = await _notify(
        fcm,
        fcm_token=token,
        notification_title="New reply",
        notification_body="We fixed it",
        data_payload={"ticket_id": "t-42", "kind": "reply"},
        android_config={"priority": "high", "collapse_key": "ticket-42"},
        apns_config={"payload": {"aps": {"badge": 3, "thread-id": "ticket-42"}}},
    )

    assert re.fullmatch(rf"projects/{PROJECT}/messages/0:\d+%[0-9a-f]{{16}}", result["name"])
    [got] = await fcm_fake.wait_for(1, timeout=2)
    assert got.name == result["name"]
    assert got.token == token
    assert got.project_id == PROJECT
    assert got.message == {
        "token": token,
        "notification": {"title": "New reply", "body": "We fixed it"},
        "data": {"ticket_id": "t-42", "kind": "reply"},
        "android": {"priority": "high", "collapse_key": "ticket-42"},
        "apns": {"payload": {"aps": {"badge": 3, "thread-id": "ticket-42"}}},
    }
    assert got.body["validate_only"] is False  # pyfcm always sends it
    assert got.headers["authorization"].startswith("Bearer ya29.fake-")
    assert got.client_email is not None
    assert got.client_email.endswith(f"@{PROJECT}.iam.gserviceaccount.com")
    assert fcm_fake.token_requests == 1


async def test_fcm_credentials_object_needs_scopes(fcm_fake: FcmFake) -> None:
    info = fcm_fake.service_account(PROJECT)
    scoped = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
        info, scopes=[FCM_SCOPE]
    )
    fcm = FCMNotification(credentials=scoped, adapter=HTTPAdapter(max_retries=0))
    fcm.FCM_END_POINT_BASE = fcm_fake.pyfcm_endpoint_base
    result = await _notify(fcm, fcm_token=fcm_fake.make_token(), notification_title="Hi")
    assert result["name"].startswith(f"projects/{PROJECT}/messages/")  # project from creds

    # pyfcm only adds the scope when it loads a file itself; unscoped creds -> invalid_scope,
    # which pyfcm reports as InvalidDataError (it wraps every token failure so).
    unscoped = service_account.Credentials.from_service_account_info(info)  # type: ignore[no-untyped-call]
    fcm = FCMNotification(credentials=unscoped, adapter=HTTPAdapter(max_retries=0))
    fcm.FCM_END_POINT_BASE = fcm_fake.pyfcm_endpoint_base
    with pytest.raises(InvalidDataError, match="invalid_scope"):
        await _notify(fcm, fcm_token=fcm_fake.make_token(), notification_title="Hi")


FCM_ERRORS: list[tuple[str, type[Exception], int]] = [
    ("UNREGISTERED", FCMNotRegisteredError, 404),
    ("INVALID_ARGUMENT", InvalidDataError, 400),
    ("SENDER_ID_MISMATCH", FCMSenderIdMismatchError, 403),
    ("QUOTA_EXCEEDED", FCMServerError, 429),
    ("UNAVAILABLE", FCMServerError, 503),
    ("INTERNAL", FCMServerError, 500),
    ("THIRD_PARTY_AUTH_ERROR", AuthenticationError, 401),
]


@pytest.mark.parametrize(("code", "exc", "status"), FCM_ERRORS)
async def test_fcm_injected_errors_surface_as_pyfcm_exceptions(
    fcm_fake: FcmFake, account_file: Path, code: str, exc: type[Exception], status: int
) -> None:
    fcm = _pyfcm(fcm_fake, account_file)
    token = fcm_fake.make_token()
    # retry_after=0: no Retry-After header (pyfcm would otherwise sleep and retry).
    fcm_fake.fail_next(code, retry_after=0)

    with pytest.raises(exc):
        await _notify(fcm, fcm_token=token, notification_title="Hi")

    [attempt] = fcm_fake.attempts
    assert (attempt.status, attempt.error_code) == (status, code)
    assert fcm_fake.received == []
    # The error body, as the server sees it when it posts through pyfcm's session.
    fcm_fake.fail_next(code, retry_after=0)
    response = await asyncio.to_thread(_raw_post, fcm, fcm_token=token, notification_title="Hi")
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (status, status)
    assert error["details"][0] == {
        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
        "errorCode": code,
    }


async def test_fcm_quota_exceeded_sends_retry_after_which_pyfcm_sleeps_on(
    fcm_fake: FcmFake, account_file: Path
) -> None:
    fcm = _pyfcm(fcm_fake, account_file)
    token = fcm_fake.make_token()

    fcm_fake.fail_next("QUOTA_EXCEEDED")  # FCM's default: Retry-After: 60
    response = await asyncio.to_thread(_raw_post, fcm, fcm_token=token, notification_title="Hi")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "60"
    assert response.json()["error"]["status"] == "RESOURCE_EXHAUSTED"

    # notify() itself blocks for Retry-After seconds and retries (unbounded recursion while
    # FCM keeps answering 429); the caller never sees the 429.
    fcm_fake.fail_next("QUOTA_EXCEEDED", retry_after=1)
    started = time.monotonic()
    result = await _notify(fcm, fcm_token=token, notification_title="Hi")
    assert time.monotonic() - started >= 1.0
    assert result["name"].startswith(f"projects/{PROJECT}/messages/")
    assert [a.status for a in fcm_fake.attempts] == [429, 429, 200]


async def test_fcm_default_pyfcm_adapter_retries_503_inside_the_call(
    fcm_fake: FcmFake, account_file: Path
) -> None:
    fcm = _pyfcm(fcm_fake, account_file, retries=True)
    fcm_fake.fail_next("UNAVAILABLE")

    result = await _notify(fcm, fcm_token=fcm_fake.make_token(), notification_title="Hi")

    assert "name" in result
    assert [a.status for a in fcm_fake.attempts] == [503, 200]


async def test_fcm_real_checks(fcm_fake: FcmFake, account_file: Path) -> None:
    fcm = _pyfcm(fcm_fake, account_file)
    token = fcm_fake.make_token()

    fcm_fake.unregister(token)
    with pytest.raises(FCMNotRegisteredError):
        await _notify(fcm, fcm_token=token, notification_title="Hi")
    fcm_fake.reregister(token)

    with pytest.raises(InvalidDataError, match="not a valid FCM registration token"):
        await _notify(fcm, fcm_token="bad token!", notification_title="Hi")
    with pytest.raises(InvalidDataError, match=r"message\.data\[1\]\.value.*TYPE_STRING"):
        await _notify(fcm, fcm_token=token, data_payload={"a_ok": "1", "b_count": 2})
    with pytest.raises(InvalidDataError, match="Invalid data payload key: from"):
        await _notify(fcm, fcm_token=token, data_payload={"from": "x"})
    with pytest.raises(InvalidDataError, match="Android message is too big"):
        await _notify(fcm, fcm_token=token, data_payload={"blob": "x" * 5000})
    with pytest.raises(InvalidDataError, match=r"message\.android\.priority"):
        await _notify(fcm, fcm_token=token, notification_title="Hi", android_config={"priority": 9})
    with pytest.raises(InvalidDataError, match='Unknown name \\\\"colour\\\\"'):
        await _notify(fcm, fcm_token=token, android_config={"colour": "red"})
    with pytest.raises(InvalidDataError, match="Exactly one of token, topic or condition"):
        await _notify(fcm, fcm_token=token, topic_name="news", notification_title="Hi")

    assert (await _notify(fcm, topic_name="news", notification_title="Hi"))["name"]
    dry = await _notify(fcm, fcm_token=token, notification_title="Hi", dry_run=True)
    assert dry == {"name": f"projects/{PROJECT}/messages/fake_message_id"}
    assert fcm_fake.received_count == 1  # validate_only is not delivered
    assert [a.status for a in fcm_fake.attempts] == [
        404,
        400,
        400,
        400,
        400,
        400,
        400,
        400,
        200,
        200,
    ]


async def test_fcm_auth_checks(fcm_fake: FcmFake, account_file: Path) -> None:
    async with httpx.AsyncClient() as http:
        url = fcm_fake.send_url(PROJECT)
        body = {"message": {"token": fcm_fake.make_token(), "notification": {"title": "x"}}}
        missing = await http.post(url, json=body)
        assert missing.status_code == 401
        assert missing.json()["error"]["status"] == "UNAUTHENTICATED"
        bogus = await http.post(url, json=body, headers={"authorization": "Bearer ya29.nope"})
        assert bogus.status_code == 401

        info = _load_json(account_file)
        grant = await http.post(
            info["token_uri"],
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": _assertion(info, info["private_key"]),
            },
        )
        assert grant.status_code == 200
        issued = grant.json()
        assert issued["token_type"] == "Bearer"
        assert issued["expires_in"] == 3600
        auth = {"authorization": f"Bearer {issued['access_token']}"}
        assert (await http.post(url, json=body, headers=auth)).status_code == 200
        other_project = await http.post(fcm_fake.send_url("someone-else"), json=body, headers=auth)
        assert other_project.status_code == 403
        assert other_project.json()["error"]["status"] == "PERMISSION_DENIED"

        forged_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged_pem = forged_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}
        bad = await http.post(
            info["token_uri"], data={**form, "assertion": _assertion(info, forged_pem)}
        )
        assert (bad.status_code, bad.json()["error"]) == (400, "invalid_grant")
        stale = await http.post(
            info["token_uri"],
            data={**form, "assertion": _assertion(info, info["private_key"], age=7200)},
        )
        assert (stale.status_code, stale.json()["error"]) == (400, "invalid_grant")
        wrong_grant = await http.post(
            info["token_uri"], data={"grant_type": "password", "assertion": "x"}
        )
        assert (wrong_grant.status_code, wrong_grant.json()["error"]) == (
            400,
            "unsupported_grant_type",
        )

    # pyfcm: an expired access token -> 401 ACCESS_TOKEN_EXPIRED -> it refreshes and resends.
    # pyfcm's session (and token) is per thread: use one thread for both sends.
    fcm = _pyfcm(fcm_fake, account_file)
    loop = asyncio.get_running_loop()
    before = fcm_fake.token_requests
    with ThreadPoolExecutor(max_workers=1) as one_thread:
        send = functools.partial(
            fcm.notify, fcm_token=fcm_fake.make_token(), notification_title="Hi"
        )
        await loop.run_in_executor(one_thread, send)
        assert fcm_fake.token_requests == before + 1
        fcm_fake.expire_access_tokens()
        await loop.run_in_executor(one_thread, send)
    assert fcm_fake.token_requests == before + 2
    assert [a.status for a in fcm_fake.attempts][-3:] == [200, 401, 200]


def _assertion(info: dict[str, str], private_pem: str, *, age: int = 0) -> str:
    now = int(time.time()) - age
    return jwt.encode(
        {
            "iss": info["client_email"],
            "aud": "https://oauth2.googleapis.com/token",  # what google-auth sends
            "scope": FCM_SCOPE,
            "iat": now,
            "exp": now + 3600,
        },
        private_pem,
        algorithm="RS256",
        headers={"kid": info["private_key_id"]},
    )


async def test_fcm_hang_mode_and_timeouts(fcm_fake: FcmFake, account_file: Path) -> None:
    token = fcm_fake.make_token()
    fcm_fake.hang_next(token=token)
    async with httpx.AsyncClient() as http:
        info = _load_json(account_file)
        grant = await http.post(
            info["token_uri"],
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": _assertion(info, info["private_key"]),
            },
        )
        auth = {"authorization": f"Bearer {grant.json()['access_token']}"}
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                fcm_fake.send_url(PROJECT),
                json={"message": {"token": token}},
                headers=auth,
                timeout=0.5,
            )
    assert [a.status for a in await fcm_fake.wait_for_attempts(1)] == [0]


async def test_fcm_wait_for_and_stop(fcm_fake: FcmFake, account_file: Path) -> None:
    fcm = _pyfcm(fcm_fake, account_file)
    # Warm up in one thread first: a fresh FCMNotification built from a file, used from
    # several threads at once, races in _initialize_credentials and can raise
    # TypeError ("Bearer " + None).
    await _notify(fcm, fcm_token=fcm_fake.make_token(), notification_title="warm-up")
    fcm_fake.reset()
    sends = asyncio.gather(
        *(
            _notify(fcm, fcm_token=fcm_fake.make_token(), notification_title=str(i))
            for i in range(5)
        )
    )
    received = await fcm_fake.wait_for(5, timeout=10)
    await sends
    assert sorted(r.notification["title"] for r in received) == ["0", "1", "2", "3", "4"]
    with pytest.raises(TimeoutError, match="got 5"):
        await fcm_fake.wait_for(6, timeout=0.1)

    port = fcm_fake.port
    await fcm_fake.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


# --------------------------------------------------------------------------- CLI


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _read_until(
    stream: asyncio.StreamReader, pattern: str, lines: list[str], within: float = 20
) -> None:
    deadline = time.monotonic() + within
    while not any(re.search(pattern, line) for line in lines):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line matching {pattern!r} in:\n" + "".join(lines))
        line = await asyncio.wait_for(stream.readline(), remaining)
        if not line:
            raise AssertionError("push-sink exited; output:\n" + "".join(lines))
        lines.append(line.decode())


async def test_cli_push_sink_prints_env_and_received_pushes(tmp_path: Path) -> None:
    sink_state = tmp_path / "sink"
    apns_port, fcm_port = _free_port(), _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from tellback_server.cli.dev import dev; dev()",
        "push-sink",
        "--apns-port",
        str(apns_port),
        "--fcm-port",
        str(fcm_port),
        "--state-dir",
        str(sink_state),
        "--project-id",
        PROJECT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    client: APNs | None = None
    try:
        await _read_until(proc.stdout, r"Waiting for pushes", lines)
        text = "".join(lines)
        env = dict(re.findall(r"export (TELLBACK_\w+)=(\S+)", text))
        assert env["TELLBACK_APNS_HOST"] == "127.0.0.1"
        assert env["TELLBACK_APNS_PORT"] == str(apns_port)
        assert _text(Path(env["TELLBACK_APNS_CA_FILE"])).startswith("-----BEGIN CERTIFICATE")
        assert env["TELLBACK_FCM_ENDPOINT"] == f"http://127.0.0.1:{fcm_port}"
        key_file = Path(_field(text, "key file"))
        key_id, team_id = _field(text, "key id"), _field(text, "team id")
        topic = _field(text, "topic").split()[0]
        account = Path(_field(text, "service account"))
        assert _text(key_file).startswith("-----BEGIN PRIVATE KEY-----")
        assert _load_json(account)["token_uri"] == f"http://127.0.0.1:{fcm_port}/token"

        # APNs, configured only from what the sink printed.
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=env["TELLBACK_APNS_CA_FILE"])
        client = APNs(
            key=_text(key_file),
            key_id=key_id,
            team_id=team_id,
            topic=topic,
            ssl_context=context,
            max_connection_attempts=1,
        )
        client.pool.protocol_class = type(
            "SinkProtocol",
            (APNsProductionClientProtocol,),
            {
                "APNS_SERVER": env["TELLBACK_APNS_HOST"],
                "APNS_PORT": int(env["TELLBACK_APNS_PORT"]),
            },
        )
        device = "ab12" * 16
        result = await asyncio.wait_for(
            client.send_notification(
                NotificationRequest(
                    device_token=device,
                    message={
                        "aps": {
                            "alert": {"title": "Sink title", "body": "Sink body"},
                            "badge": 7,
                            "thread-id": "ticket-9",
                        },
                        "ticket_id": "9",
                    },
                    push_type=PushType.ALERT,
                )
            ),
            10,
        )
        assert result.status == "200"
        await _read_until(proc.stdout, r"custom:.*ticket_id", lines)

        # FCM, likewise.
        fcm = FCMNotification(service_account_file=str(account), adapter=HTTPAdapter(max_retries=0))
        fcm.FCM_END_POINT_BASE = f"{env['TELLBACK_FCM_ENDPOINT']}/v1/projects"
        await _notify(
            fcm,
            fcm_token=FcmFake.make_token(),
            notification_title="Android title",
            data_payload={"ticket_id": "9"},
        )
        await _read_until(proc.stdout, r"data:.*ticket_id", lines)
    finally:
        if client is not None:
            client.pool.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), 15)
        lines.append(rest.decode())
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert re.search(r"APNs  200  token ab12ab12ab12…  topic com\.example\.tellback", output)
    assert "title:    Sink title" in output
    assert "body:     Sink body" in output
    assert 'badge 7   thread-id "ticket-9"' in output
    assert "FCM   200  token " in output
    assert "title:    Android title" in output
    assert "push sink stopped" in output


def _text(path: Path) -> str:
    return path.read_text()


def _load_json(path: Path) -> dict[str, str]:
    data: dict[str, str] = json.loads(path.read_text())
    return data


def _field(text: str, label: str) -> str:
    match = re.search(rf"^\s+{label}:\s+(.+)$", text, re.MULTILINE)
    assert match is not None, f"{label!r} not in output:\n{text}"
    return match.group(1).strip()
