"""``tellback_sdk.webhooks.verify`` against what the server really signs (its event rows,
body encoding and ``signature_header``) and against ``standardwebhooks`` itself."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time

import httpx
import pytest
from sqlalchemy import select
from standardwebhooks import Webhook

from tellback_sdk import TellbackError
from tellback_sdk.webhooks import WebhookEvent, WebhookVerificationError, verify
from tellback_server.db.models import Event
from tellback_server.domain.events.records import EVENT_COLUMNS, EventRecord
from tellback_server.domain.webhooks.signing import new_secret, signature_header
from tests.sdk.conftest import InProcess


def signed(
    secrets: list[str], body: bytes, msg_id: str = "42", at: int | None = None
) -> dict[str, str]:
    """The headers ``webhook.deliver`` sends."""
    ts = int(time.time()) if at is None else at
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature_header(secrets, msg_id, ts, body),
    }


async def server_bodies(server: InProcess) -> dict[str, tuple[str, bytes]]:
    """Real events of a feedback loop, encoded as ``webhook.deliver`` encodes them."""
    api, app = server.api, server.app
    user = await api.user_headers(app)
    _, agent = await api.create_agent(app)
    conv = await api.feedback(user, "Crash on start")
    for message in ({"body": "Looking into it"}, {"body": "note to self", "internal": True}):
        r = await api.http.post(
            f"/v1/agent/conversations/{conv['id']}/messages", json=message, headers=agent
        )
        assert r.status_code == 201, r.text
    async with api.state.db.session(write=False) as db:
        rows = (
            await db.execute(
                select(*EVENT_COLUMNS).where(Event.data.is_not(None)).order_by(Event.id)
            )
        ).all()
    out: dict[str, tuple[str, bytes]] = {}
    for row in rows:
        record = EventRecord.from_row(row)
        body = json.dumps(record.envelope(client=False), separators=(",", ":")).encode()
        key = record.type
        if record.type == "message.created" and b'"internal":true' in body:
            key = "internal"
        out.setdefault(key, (str(record.id), body))
    return out


async def test_server_signed_deliveries_verify_and_are_typed(server: InProcess) -> None:
    bodies = await server_bodies(server)
    assert {"conversation.created", "message.created", "conversation.updated", "internal"} <= set(
        bodies
    )
    secret = new_secret()
    events: dict[str, WebhookEvent] = {}
    for key, (msg_id, body) in bodies.items():
        events[key] = verify(body, signed([secret], body, msg_id), secret)
        assert events[key].id == msg_id
        # The reference implementation agrees with the SDK.
        Webhook(secret).verify(body, signed([secret], body, msg_id))
    created = events["conversation.created"]
    assert created.type == "conversation.created"
    assert created.timestamp is not None
    assert created.timestamp.tzinfo is not None
    assert created.conversation is not None
    assert created.conversation.app_id == server.app.id
    assert created.conversation.end_user is not None
    assert created.conversation.priority is not None
    assert created.message is not None
    assert created.message.body == "Crash on start"
    reply = events["message.created"]
    assert reply.message is not None
    assert (reply.message.author.type, reply.message.internal) == ("agent", False)
    note = events["internal"]
    assert note.message is not None
    assert note.message.internal is True
    updated = events["conversation.updated"]
    assert updated.conversation is not None
    assert updated.message is None
    assert updated.data["conversation"]["id"] == updated.conversation.id


def _body() -> bytes:
    return json.dumps(
        {
            "id": "42",
            "type": "widget.exploded",
            "timestamp": "2025-01-01T10:00:00Z",
            "data": {"widget": 1},
        },
        separators=(",", ":"),
    ).encode()


def test_standardwebhooks_signatures_verify() -> None:
    secret = new_secret()
    body = _body()
    now = dt.datetime.now(dt.UTC)
    signature = Webhook(secret).sign("msg_1", now, body.decode())
    headers = {
        "Webhook-Id": "msg_1",  # header names in any case
        "Webhook-Timestamp": str(int(now.timestamp())),
        "Webhook-Signature": signature,
    }
    event = verify(body, httpx.Headers(headers), secret)
    assert (event.id, event.type, event.data) == ("42", "widget.exploded", {"widget": 1})
    assert event.conversation is None
    assert verify(body.decode(), headers, secret).id == "42"  # a str body works too


def test_rotation_two_signatures_and_several_secrets() -> None:
    old, new, stranger = new_secret(), new_secret(), new_secret()
    body = _body()
    both = signed([new, old], body)
    assert len(both["webhook-signature"].split()) == 2
    assert verify(body, both, new).id == "42"
    assert verify(body, both, old).id == "42"
    only_old = signed([old], body)
    assert verify(body, only_old, [new, old]).id == "42"
    with pytest.raises(WebhookVerificationError):
        verify(body, only_old, [new, stranger])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tampered body", "no signature"),
        ("old timestamp", "too old"),
        ("future timestamp", "future"),
        ("wrong secret", "no signature"),
        ("no signature header", "missing"),
        ("garbage signature", "no signature"),
        ("other version only", "no signature"),
        ("bad timestamp", "unix seconds"),
        ("not utf-8", "UTF-8"),
    ],
)
def test_rejections(case: str, message: str) -> None:
    secret = new_secret()
    body = _body()
    headers = signed([secret], body)
    key = secret
    if case == "tampered body":
        body = body.replace(b"widget", b"gadget")
    elif case == "old timestamp":
        headers = signed([secret], body, at=int(time.time()) - 301)
    elif case == "future timestamp":
        headers = signed([secret], body, at=int(time.time()) + 301)
    elif case == "wrong secret":
        key = new_secret()
    elif case == "no signature header":
        del headers["webhook-signature"]
    elif case == "garbage signature":
        headers["webhook-signature"] = "v1,!!! garbage v1"
    elif case == "other version only":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    elif case == "bad timestamp":
        headers["webhook-timestamp"] = "yesterday"
    elif case == "not utf-8":
        body = b"\xff" + body
    with pytest.raises(WebhookVerificationError, match=message) as raised:
        verify(body, headers, key)
    assert isinstance(raised.value, TellbackError)


def test_tolerance_is_configurable() -> None:
    secret = new_secret()
    body = _body()
    an_hour_ago = signed([secret], body, at=int(time.time()) - 3600)
    assert verify(body, an_hour_ago, secret, tolerance=7200).id == "42"
    with pytest.raises(WebhookVerificationError):
        verify(body, signed([secret], body, at=int(time.time()) - 10), secret, tolerance=5)


def test_bad_secret_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    body = _body()
    with pytest.raises(ValueError, match="whsec_"):
        verify(body, signed([new_secret()], body), "whsec_")
    monkeypatch.setitem(sys.modules, "standardwebhooks", None)
    monkeypatch.setitem(sys.modules, "standardwebhooks.webhooks", None)
    with pytest.raises(ImportError, match=r"tellback-sdk\[webhooks\]"):
        verify(body, signed([new_secret()], body), new_secret())
