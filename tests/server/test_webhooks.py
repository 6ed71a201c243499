"""Standard Webhooks delivery, end to end against a real HTTP receiver on 127.0.0.1.

Every delivery is checked the way a customer's backend would check it: with the
``standardwebhooks`` package's ``Webhook.verify``. Jobs are driven by a
``Worker.run_until_idle``; retries are "fast-forwarded" by moving the queued
job's ``run_after`` to now.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import gc
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tellback_server.db.models import Event, Job, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tellback_server.domain.webhooks import delivery as delivery_module
from tellback_server.domain.webhooks import services as services_module
from tellback_server.domain.webhooks.outbox import JOB_KIND, SCHEDULE
from tellback_server.domain.webhooks.ssrf import resolve as real_resolve
from tellback_server.jobs.worker import Worker
from tellback_server.plugins import build_registry
from tests.server.conftest import Api, AppInfo, make_settings, serve_app
from tests.server.test_attachments_flow import jpeg_with_gps
from tests.server.webhook_receiver import Received, Reply, WebhookReceiver

PROBLEM_JSON = "application/problem+json"
# The attempt deadline of the tests about slow receivers (``tight``). The others get a
# patient one: the receiver runs in the test process, and a pause of that process (its
# heap is large by the end of the suite) once made a 1 s attempt fail on a healthy one.
TIMEOUT_S = 1.0
PATIENT_S = 10.0
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0] == PROBLEM_JSON, r.headers
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    assert body["status"] == status
    return body


def verify(secret: str, req: Received) -> dict[str, Any]:
    """What a receiver does: verify the signature over the raw body, then parse it."""
    out: dict[str, Any] = Webhook(secret).verify(req.body, dict(req.headers))
    return out


def verifies(secret: str, req: Received) -> bool:
    try:
        verify(secret, req)
    except WebhookVerificationError:
        return False
    return True


def parse_ts(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None, value
    return parsed


@dataclass
class Hooks:
    api: Api
    rx: WebhookReceiver
    app: AppInfo
    user: dict[str, str]
    agent: dict[str, str]

    @property
    def base(self) -> str:
        return f"/v1/admin/apps/{self.app.id}"

    async def run_jobs(self) -> int:
        return await Worker(self.api.state, build_registry()).run_until_idle()

    async def fast_forward(self) -> int:
        """Make every queued webhook job due now; returns how many there were."""
        now = dt.datetime.now(dt.UTC)
        async with self.api.state.db.session(write=True) as db:
            result = await db.execute(
                update(Job)
                .where(Job.kind == JOB_KIND, Job.status == "queued")
                .values(run_after=now)
                .execution_options(synchronize_session=False)
            )
            await db.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.status == "pending")
                .values(next_attempt_at=now)
                .execution_options(synchronize_session=False)
            )
        return int(getattr(result, "rowcount", 0) or 0)

    async def create(
        self, url: str | None = None, events: list[str] | None = None, **extra: Any
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"url": url or self.rx.url(), **extra}
        if events is not None:
            body["events"] = events
        r = await self.api.http.post(f"{self.base}/webhooks", json=body, headers=self.api.admin)
        assert r.status_code == 201, r.text
        data: dict[str, Any] = r.json()
        return data

    async def deliveries(self, **params: str) -> list[dict[str, Any]]:
        r = await self.api.http.get(
            f"{self.base}/webhook-deliveries", params=params, headers=self.api.admin
        )
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    async def delivery(self, delivery_id: str) -> dict[str, Any]:
        r = await self.api.http.get(
            f"{self.base}/webhook-deliveries/{delivery_id}", headers=self.api.admin
        )
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    async def only_delivery(self) -> dict[str, Any]:
        items = await self.deliveries()
        assert len(items) == 1, items
        return await self.delivery(items[0]["id"])

    async def reply(
        self, conversation_id: str, body: str = "Fixed in 2.3.2", *, internal: bool = False
    ) -> dict[str, Any]:
        r = await self.api.http.post(
            f"/v1/agent/conversations/{conversation_id}/messages",
            json={"body": body, "internal": internal},
            headers=self.agent,
        )
        assert r.status_code == 201, r.text
        data: dict[str, Any] = r.json()
        return data

    async def db_count(self, model: Any) -> int:
        async with self.api.state.db.session(write=False) as db:
            return int(await db.scalar(select(func.count()).select_from(model)) or 0)


@pytest.fixture
async def rx() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as receiver:
        yield receiver


async def _hooks(api: Api, rx: WebhookReceiver) -> Hooks:
    app = await api.create_app("Webhook Demo")
    user = await api.user_headers(app)
    _, agent = await api.create_agent(app)
    return Hooks(api, rx, app, user, agent)


@asynccontextmanager
async def _allowed(
    database_url: str, tmp_path: Path, rx: WebhookReceiver, deadline: float
) -> AsyncIterator[Hooks]:
    settings = make_settings(
        database_url,
        tmp_path / "data",
        webhook_allow_private=True,
        webhook_timeout_seconds=deadline,
    )
    async with serve_app(settings, build_registry()) as api:
        yield await _hooks(api, rx)


@pytest.fixture
async def hooks(database_url: str, tmp_path: Path, rx: WebhookReceiver) -> AsyncIterator[Hooks]:
    """An app whose webhooks may call 127.0.0.1 (the operator allowed private addresses)."""
    async with _allowed(database_url, tmp_path, rx, PATIENT_S) as h:
        yield h


@pytest.fixture
async def tight(database_url: str, tmp_path: Path, rx: WebhookReceiver) -> AsyncIterator[Hooks]:
    """The same, with a 1 s attempt deadline, for the tests about slow receivers."""
    async with _allowed(database_url, tmp_path, rx, TIMEOUT_S) as h:
        yield h


@pytest.fixture
async def guarded(database_url: str, tmp_path: Path, rx: WebhookReceiver) -> AsyncIterator[Hooks]:
    """The default configuration: private addresses refused."""
    settings = make_settings(database_url, tmp_path / "data", webhook_timeout_seconds=PATIENT_S)
    assert settings.webhook_allow_private is False
    async with serve_app(settings, build_registry()) as api:
        yield await _hooks(api, rx)


# ----- 1. registration, signing, payload -------------------------------------------------


async def test_a_photo_sent_while_processing_is_announced_when_ready(hooks: Hooks) -> None:
    """A message sent while its photo is still processing reaches receivers without the
    photo's URL (its bytes still held the location); `attachment.updated` tells them
    when it can be fetched, through the agent API. An endpoint with no filter gets it
    (empty means all types, those added later included)."""
    api = hooks.api
    await hooks.create()
    photo = jpeg_with_gps()
    r = await api.http.post(
        "/v1/client/uploads",
        json={
            "filename": "p.jpg",
            "content_type": "image/jpeg",
            "size": len(photo),
            "kind": "photo",
        },
        headers=hooks.user,
    )
    assert r.status_code == 201, r.text
    up = r.json()
    # (the local store's URL names the configured address; this app runs in process)
    url = up["single"]["url"].replace(api.state.settings.base_url(), str(api.http.base_url))
    r = await api.http.put(url, content=photo, headers=up["single"]["headers"])
    assert r.status_code == 200, r.text
    done = f"/v1/client/uploads/{up['upload_id']}/complete"
    assert (await api.http.post(done, json={}, headers=hooks.user)).status_code == 200
    await api.feedback(hooks.user, attachment_ids=[up["upload_id"]])
    await hooks.run_jobs()
    bodies = [json.loads(req.body) for req in hooks.rx.received()]
    assert [b["type"] for b in bodies] == ["conversation.created", "attachment.updated"]
    [sent] = bodies[0]["data"]["message"]["attachments"]
    assert (sent["status"], sent["url"]) == ("processing", None)
    assert bodies[1]["data"]["attachment_id"] == up["upload_id"]
    assert bodies[1]["data"]["status"] == "ready"
    r = await api.http.get(f"/v1/agent/attachments/{up['upload_id']}", headers=hooks.agent)
    assert r.json()["url"]


async def test_secret_shown_once_and_delivery_verifies_with_standardwebhooks(hooks: Hooks) -> None:
    api = hooks.api
    created = await hooks.create(description="CRM sync")
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 24
    assert created["url"] == hooks.rx.url()
    assert created["events"] == []
    assert created["enabled"] is True
    assert created["app_id"] == hooks.app.id

    # Never shown again, nor stored in the clear.
    one = await api.http.get(f"{hooks.base}/webhooks/{created['id']}", headers=api.admin)
    listed = await api.http.get(f"{hooks.base}/webhooks", headers=api.admin)
    for r in (one, listed):
        assert r.status_code == 200, r.text
        assert "secret" not in r.text.replace("previous_secret_expires_at", "")
        assert secret.removeprefix("whsec_") not in r.text
    assert [w["id"] for w in listed.json()["items"]] == [created["id"]]
    async with api.state.db.session(write=False) as db:
        sealed = await db.scalar(select(WebhookEndpoint.secret_sealed))
    assert sealed is not None
    assert secret.encode() not in sealed
    assert base64.b64decode(secret.removeprefix("whsec_")) not in sealed

    before = time.time()
    conv = await api.feedback(hooks.user, body="Checkout crashes on iOS 18")
    assert await hooks.run_jobs() >= 1
    [req] = hooks.rx.received()
    assert req.method == "POST"
    assert req.path == "/hook"
    assert req.headers["content-type"].split(";")[0] == "application/json"
    event = verify(secret, req)
    assert not verifies("whsec_" + base64.b64encode(b"k" * 32).decode(), req)
    # A tampered body does not verify (the signature covers the raw bytes).
    tampered = Received(req.method, req.path, req.headers, req.body + b" ", req.at)
    assert not verifies(secret, tampered)

    assert event["type"] == "conversation.created"
    assert abs(parse_ts(event["timestamp"]).timestamp() - before) < 60
    data = event["data"]
    assert data["conversation"]["id"] == conv["id"]
    assert data["message"]["id"] == conv["last_message"]["id"]
    assert data["message"]["body"] == "Checkout crashes on iOS 18"
    assert data["message"]["author"]["type"] == "user"

    ts = int(req.headers["webhook-timestamp"])
    assert before - 5 <= ts <= time.time() + 5
    sigs = req.headers["webhook-signature"].split(" ")
    assert len(sigs) == 1
    assert sigs[0].startswith("v1,")

    d = await hooks.only_delivery()
    assert d["status"] == "succeeded"
    assert d["event_type"] == "conversation.created"
    assert d["endpoint_id"] == created["id"]
    assert req.headers["webhook-id"] == d["event_id"]
    async with api.state.db.session(write=False) as db:
        event_ids = list(await db.scalars(select(Event.id).where(Event.type == event["type"])))
    assert [str(i) for i in event_ids] == [req.headers["webhook-id"]]
    # The log's copy of the event is what was sent.
    assert d["payload"] == event
    assert d["delivered_at"] is not None
    assert d["attempts"] == 1
    [attempt] = d["attempt_log"]
    assert attempt["status_code"] == 200
    assert attempt["error"] is None
    assert attempt["response_excerpt"] == "ok"


async def test_webhook_id_is_stable_across_retries_and_log_records_each_attempt(
    hooks: Hooks,
) -> None:
    created = await hooks.create()
    hooks.rx.then(Reply(status=500, body=b"database is down"))
    await hooks.api.feedback(hooks.user)
    await hooks.run_jobs()
    assert len(hooks.rx.received()) == 1

    [item] = await hooks.deliveries()
    assert item["status"] == "pending"
    assert item["attempts"] == 1
    assert item["last_status_code"] == 500
    assert item["last_error"]
    assert item["delivered_at"] is None
    # First retry about SCHEDULE[0] seconds later (with jitter), not now.
    next_at = parse_ts(item["next_attempt_at"]).timestamp()
    assert time.time() + SCHEDULE[0] * 0.7 < next_at < time.time() + SCHEDULE[0] * 1.3 + 1
    assert await hooks.run_jobs() == 0  # not due yet
    assert len(hooks.rx.received()) == 1

    assert await hooks.fast_forward() == 1
    await hooks.run_jobs()
    first, second = hooks.rx.received()
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == item["event_id"]
    assert first.body == second.body
    verify(created["secret"], first)
    verify(created["secret"], second)

    d = await hooks.delivery(item["id"])
    assert d["status"] == "succeeded"
    assert d["attempts"] == 2
    assert d["last_status_code"] == 200
    assert d["last_error"] is None
    assert d["next_attempt_at"] is None
    assert d["delivered_at"] is not None
    log = d["attempt_log"]
    assert [a["attempt"] for a in log] == [1, 2]
    assert [a["status_code"] for a in log] == [500, 200]
    assert log[0]["error"]
    assert "500" in log[0]["error"]
    assert log[0]["response_excerpt"] == "database is down"
    assert log[1]["error"] is None
    for a in log:
        assert isinstance(a["duration_ms"], int)
        assert 0 <= a["duration_ms"] < 5000
    # Filters of the log.
    assert [x["id"] for x in await hooks.deliveries(status="succeeded")] == [item["id"]]
    assert await hooks.deliveries(status="pending") == []
    assert await hooks.deliveries(status="failed") == []
    assert [x["id"] for x in await hooks.deliveries(webhook_id=created["id"])] == [item["id"]]


# ----- 2. event types and filters --------------------------------------------------------


async def test_event_filter_and_which_actions_emit_what(hooks: Hooks) -> None:
    api, rx = hooks.api, hooks.rx
    only_messages = await hooks.create(url=rx.url("/messages"), events=["message.created"])
    everything = await hooks.create(url=rx.url("/all"))
    assert only_messages["events"] == ["message.created"]

    conv = await api.feedback(hooks.user)
    await hooks.run_jobs()
    assert rx.received("/messages") == []
    assert [verify(everything["secret"], r)["type"] for r in rx.received("/all")] == [
        "conversation.created"
    ]

    reply = await hooks.reply(conv["id"], "Can you send a screenshot?")
    await hooks.run_jobs()
    [msg] = rx.received("/messages")
    event = verify(only_messages["secret"], msg)
    assert event["type"] == "message.created"
    assert event["data"]["message"]["id"] == reply["id"]
    assert event["data"]["message"]["author"]["type"] == "agent"
    assert event["data"]["message"]["internal"] is False
    assert event["data"]["conversation"]["id"] == conv["id"]
    # The reply answered an open conversation (open -> pending): the unfiltered endpoint
    # also hears conversation.updated.
    all_types = sorted(verify(everything["secret"], r)["type"] for r in rx.received("/all"))
    assert all_types == ["conversation.created", "conversation.updated", "message.created"]

    # An internal note is a message.created for webhooks (agent view), flagged internal.
    note = await hooks.reply(conv["id"], "customer on the legacy plan", internal=True)
    await hooks.run_jobs()
    notes = [verify(only_messages["secret"], r) for r in rx.received("/messages")[1:]]
    assert [(e["type"], e["data"]["message"]["id"]) for e in notes] == [
        ("message.created", note["id"])
    ]
    assert notes[0]["data"]["message"]["internal"] is True

    # The end user reading (unread.changed, a client-only event) reaches no endpoint.
    seen = len(rx.requests)
    r = await api.http.post(
        f"/v1/client/conversations/{conv['id']}/read",
        json={"up_to_message_id": reply["id"]},
        headers=hooks.user,
    )
    assert r.status_code == 204, r.text
    await hooks.run_jobs()
    assert len(rx.requests) == seen

    # A user follow-up: message.created (and the pending conversation reopens).
    r = await api.http.post(
        f"/v1/client/conversations/{conv['id']}/messages",
        json={"body": "here it is"},
        headers=hooks.user,
    )
    assert r.status_code == 201, r.text
    # PATCH by the agent: conversation.updated, not for the filtered endpoint.
    r = await api.http.patch(
        f"/v1/agent/conversations/{conv['id']}", json={"status": "solved"}, headers=hooks.agent
    )
    assert r.status_code == 200, r.text
    await hooks.run_jobs()
    filtered = [verify(only_messages["secret"], r)["type"] for r in rx.received("/messages")]
    assert filtered == ["message.created"] * 3
    # The follow-up (message.created, conversation.updated: reopened) and the PATCH are
    # deliveries run concurrently: their arrival order is not fixed (webhooks promise no
    # order; each event carries its time).
    last = [verify(everything["secret"], r) for r in rx.received("/all")[-3:]]
    assert sorted((e["type"], e["data"]["conversation"]["status"]) for e in last) == [
        ("conversation.updated", "open"),
        ("conversation.updated", "solved"),
        ("message.created", "open"),
    ]
    # Every request carries a distinct webhook-id (one per event and endpoint pair).
    for path in ("/messages", "/all"):
        ids = [r.headers["webhook-id"] for r in rx.received(path)]
        assert len(ids) == len(set(ids))
    assert {d["status"] for d in await hooks.deliveries(limit="100")} == {"succeeded"}


# ----- 3/4. failures, outages and timeouts -----------------------------------------------


async def test_receiver_down_then_up(hooks: Hooks) -> None:
    created = await hooks.create()
    await hooks.rx.down()
    await hooks.api.feedback(hooks.user)
    started = time.monotonic()
    await hooks.run_jobs()
    assert time.monotonic() - started < 5
    [item] = await hooks.deliveries()
    assert item["status"] == "pending"
    assert item["last_status_code"] is None
    assert item["last_error"]
    assert item["attempts"] == 1

    await hooks.rx.up()
    await hooks.fast_forward()
    await hooks.run_jobs()
    [req] = hooks.rx.received()
    verify(created["secret"], req)
    d = await hooks.delivery(item["id"])
    assert d["status"] == "succeeded"
    assert [a["status_code"] for a in d["attempt_log"]] == [None, 200]
    assert d["attempt_log"][0]["error"]


@SQLITE_ONLY
async def test_slow_receiver_times_out_and_is_retried(tight: Hooks) -> None:
    hooks = tight
    created = await hooks.create()
    hooks.rx.then(Reply(delay=TIMEOUT_S * 4))
    await hooks.api.feedback(hooks.user)
    started = time.monotonic()
    await hooks.run_jobs()
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT_S * 3, elapsed  # the attempt was cut at the timeout
    [item] = await hooks.deliveries()
    assert item["status"] == "pending"
    assert item["last_status_code"] is None
    d = await hooks.delivery(item["id"])
    [attempt] = d["attempt_log"]
    assert attempt["status_code"] is None
    assert attempt["error"]
    assert "time" in attempt["error"].lower() or "within" in attempt["error"].lower()
    assert TIMEOUT_S * 1000 * 0.9 <= attempt["duration_ms"] < TIMEOUT_S * 1000 * 2.5

    await hooks.fast_forward()
    await hooks.run_jobs()
    first, second = hooks.rx.received()
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    verify(created["secret"], second)
    assert (await hooks.delivery(item["id"]))["status"] == "succeeded"


@SQLITE_ONLY
async def test_a_slow_name_lookup_counts_against_the_deadline(
    tight: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt's deadline covers the lookup of the receiver's name too: a resolver
    that hangs held the worker's slot for as long as it liked."""
    hooks = tight
    await hooks.create()

    async def hanging(url: str, *, allow_private: bool) -> list[Any]:
        await asyncio.sleep(TIMEOUT_S * 10)
        return await real_resolve(url, allow_private=allow_private)

    monkeypatch.setattr(delivery_module, "resolve", hanging)
    await hooks.api.feedback(hooks.user)
    started = time.monotonic()
    await hooks.run_jobs()
    assert time.monotonic() - started < TIMEOUT_S * 3
    [item] = await hooks.deliveries()
    assert item["status"] == "pending"
    [attempt] = (await hooks.delivery(item["id"]))["attempt_log"]
    assert "resolve" in attempt["error"]
    assert hooks.rx.received() == []


@SQLITE_ONLY
async def test_a_2xx_whose_body_stalls_is_a_success(tight: Hooks) -> None:
    """The status line is the receiver's answer: one that said 200 and then stalled its
    body past the deadline has the event, and is not sent it again (it was, as "no
    answer"); a 503 that stalls is a 503, retried."""
    hooks = tight
    await hooks.create()
    hooks.rx.then(Reply(status=200, stall=TIMEOUT_S * 3), Reply(status=503, stall=TIMEOUT_S * 3))
    await hooks.api.feedback(hooks.user)
    await hooks.api.feedback(hooks.user)
    await hooks.run_jobs()
    items = await hooks.deliveries()
    assert sorted((i["status"], i["last_status_code"]) for i in items) == [
        ("pending", 503),
        ("succeeded", 200),
    ]
    assert len(hooks.rx.received()) == 2


async def test_retry_after_is_honoured_and_2xx_other_than_200_is_success(hooks: Hooks) -> None:
    await hooks.create()
    hooks.rx.then(Reply(status=503, headers={"Retry-After": "600"}), Reply(status=204, body=b""))
    await hooks.api.feedback(hooks.user)
    await hooks.run_jobs()
    [item] = await hooks.deliveries()
    next_at = parse_ts(item["next_attempt_at"]).timestamp()
    assert next_at >= time.time() + 590
    async with hooks.api.state.db.session(write=False) as db:
        job = await db.scalar(select(Job).where(Job.kind == JOB_KIND))
    assert job is not None
    assert job.status == "queued"
    assert job.run_after.timestamp() >= time.time() + 590
    await hooks.fast_forward()
    await hooks.run_jobs()
    d = await hooks.delivery(item["id"])
    assert d["status"] == "succeeded"
    assert [a["status_code"] for a in d["attempt_log"]] == [503, 204]


# ----- 5. retries exhausted, replay ------------------------------------------------------


async def test_retries_exhausted_then_manual_replay(hooks: Hooks) -> None:
    api = hooks.api
    created = await hooks.create()
    total = len(SCHEDULE) + 1
    hooks.rx.status(500, times=total)
    await api.feedback(hooks.user)
    await hooks.run_jobs()
    [item] = await hooks.deliveries()
    did = item["id"]
    for n in range(2, total + 1):
        assert await hooks.fast_forward() == 1, f"no retry queued before attempt {n}"
        await hooks.run_jobs()
        d = await hooks.delivery(did)
        assert d["attempts"] == n
        assert d["status"] == ("failed" if n == total else "pending")
    assert await hooks.fast_forward() == 0  # nothing left queued
    assert len(hooks.rx.received()) == total

    d = await hooks.delivery(did)
    assert d["status"] == "failed"
    assert d["last_status_code"] == 500
    assert d["next_attempt_at"] is None
    assert d["delivered_at"] is None
    assert [a["attempt"] for a in d["attempt_log"]] == list(range(1, total + 1))
    assert {a["status_code"] for a in d["attempt_log"]} == {500}
    assert [x["id"] for x in await hooks.deliveries(status="failed")] == [did]
    async with api.state.db.session(write=False) as db:
        jobs = list(await db.scalars(select(Job.status).where(Job.kind == JOB_KIND)))
    assert jobs == ["failed"]

    # Manual replay: 202, delivered again with the same webhook-id.
    r = await api.http.post(f"{hooks.base}/webhook-deliveries/{did}/replay", headers=api.admin)
    assert r.status_code == 202, r.text
    assert r.json()["id"] == did
    assert r.json()["status"] == "pending"
    # While it is pending, another replay is refused.
    again = await api.http.post(f"{hooks.base}/webhook-deliveries/{did}/replay", headers=api.admin)
    problem(again, 409, "delivery_pending")
    await hooks.run_jobs()
    replayed = hooks.rx.received()[-1]
    assert len(hooks.rx.received()) == total + 1
    assert replayed.headers["webhook-id"] == hooks.rx.received()[0].headers["webhook-id"]
    assert replayed.body == hooks.rx.received()[0].body
    verify(created["secret"], replayed)
    d = await hooks.delivery(did)
    assert d["status"] == "succeeded"
    assert d["attempts"] == total + 1
    assert d["attempt_log"][-1]["status_code"] == 200
    assert d["attempt_log"][-1]["attempt"] == total + 1

    # A succeeded delivery may be replayed too.
    r = await api.http.post(f"{hooks.base}/webhook-deliveries/{did}/replay", headers=api.admin)
    assert r.status_code == 202, r.text
    await hooks.run_jobs()
    assert len(hooks.rx.received()) == total + 2
    assert (await hooks.delivery(did))["status"] == "succeeded"


async def test_replay_of_pending_delivery_is_409(hooks: Hooks) -> None:
    await hooks.create()
    await hooks.api.feedback(hooks.user)
    [item] = await hooks.deliveries()
    assert item["status"] == "pending"
    r = await hooks.api.http.post(
        f"{hooks.base}/webhook-deliveries/{item['id']}/replay", headers=hooks.api.admin
    )
    problem(r, 409, "delivery_pending")
    await hooks.run_jobs()
    assert len(hooks.rx.received()) == 1  # the refused replay queued nothing extra


# ----- 6. secret rotation ----------------------------------------------------------------


async def _rotate(hooks: Hooks, webhook_id: str, **body: Any) -> dict[str, Any]:
    r = await hooks.api.http.post(
        f"{hooks.base}/webhooks/{webhook_id}/rotate-secret", json=body, headers=hooks.api.admin
    )
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def test_secret_rotation_signs_with_both_secrets_during_the_overlap(hooks: Hooks) -> None:
    api = hooks.api
    created = await hooks.create()
    first = created["secret"]
    rotated = await _rotate(hooks, created["id"], overlap_seconds=3600)
    second = rotated["secret"]
    assert second.startswith("whsec_")
    assert second != first
    expires = parse_ts(rotated["previous_secret_expires_at"]).timestamp()
    assert time.time() + 3500 < expires < time.time() + 3700
    shown = await api.http.get(f"{hooks.base}/webhooks/{created['id']}", headers=api.admin)
    assert shown.json()["previous_secret_expires_at"] is not None
    assert second.removeprefix("whsec_") not in shown.text

    await api.feedback(hooks.user)
    await hooks.run_jobs()
    [req] = hooks.rx.received()
    sigs = req.headers["webhook-signature"].split(" ")
    assert len(sigs) == 2
    assert all(s.startswith("v1,") for s in sigs)
    assert verifies(first, req)
    assert verifies(second, req)

    # Rotating again with an overlap: the newest two sign, the first no longer does.
    third = (await _rotate(hooks, created["id"]))["secret"]
    conv = await api.feedback(hooks.user)
    await hooks.run_jobs()
    req = hooks.rx.received()[-1]
    assert len(req.headers["webhook-signature"].split(" ")) == 2
    assert verifies(third, req)
    assert verifies(second, req)
    assert not verifies(first, req)

    # overlap_seconds=0: only the new secret signs, at once.
    fourth = await _rotate(hooks, created["id"], overlap_seconds=0)
    assert fourth["previous_secret_expires_at"] is None
    await hooks.reply(conv["id"])
    await hooks.run_jobs()
    latest = hooks.rx.received()[2:]
    assert latest  # message.created and conversation.updated
    for req in latest:
        assert len(req.headers["webhook-signature"].split(" ")) == 1
        assert verifies(fourth["secret"], req)
        assert not verifies(third, req)
        assert not verifies(second, req)
    shown = await api.http.get(f"{hooks.base}/webhooks/{created['id']}", headers=api.admin)
    assert shown.json()["previous_secret_expires_at"] is None


async def test_rotation_overlap_expiry_drops_the_old_signature(hooks: Hooks) -> None:
    created = await hooks.create()
    new = (await _rotate(hooks, created["id"], overlap_seconds=3600))["secret"]
    # The overlap ends (simulated: its end is moved to the past).
    async with hooks.api.state.db.session(write=True) as db:
        await db.execute(
            update(WebhookEndpoint).values(
                previous_secret_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            )
        )
    await hooks.api.feedback(hooks.user)
    await hooks.run_jobs()
    [req] = hooks.rx.received()
    assert len(req.headers["webhook-signature"].split(" ")) == 1
    assert verifies(new, req)
    assert not verifies(created["secret"], req)


# ----- 7. SSRF guard ---------------------------------------------------------------------

REFUSED_URLS = [
    "http://127.0.0.1:{port}/hook",
    "http://localhost/",
    "http://localhost:{port}/hook",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # CGNAT
    "http://169.254.169.254/latest/meta-data",
    "http://0.0.0.0/",
    "http://0/",
    "http://2130706433/",  # 127.0.0.1 as a decimal number
    "http://127.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://224.0.0.1/",  # multicast (is_global is True for it)
    "http://[64:ff9b::a00:1]/",  # NAT64 to 10.0.0.1
    "http://[64:ff9b:1::a9fe:a9fe]/",  # local-use NAT64 (RFC 8215), to 169.254.169.254
    "http://[::ffff:0:127.0.0.1]/",  # SIIT's IPv4-translated form (RFC 2765)
    "http://[2002:a00:1::]/",  # 6to4 from 10.0.0.1
    "http://[::10.0.0.1]/",  # IPv4-compatible
    "http://[fec0::1]/",  # site-local
    "http://[fe80::1]/",
    "http://[fd00:ec2::254]/",  # AWS IPv6 metadata
    "http://[fc00::1]/",
    "http://[::]/",
    "ftp://example.com/hook",
    "file:///etc/passwd",
    "gopher://example.com/",
    "javascript:alert(1)",
    "example.com/hook",
    "http://user:pass@example.com/hook",
    "https://token@example.com/hook",
    "http:///nohost",
    "http://example.com:99999/",
]


@SQLITE_ONLY
async def test_ssrf_guard_refuses_private_addresses_at_registration(guarded: Hooks) -> None:
    api = guarded.api
    wrong = []
    for template in REFUSED_URLS:
        url = template.format(port=guarded.rx.port)
        r = await api.http.post(f"{guarded.base}/webhooks", json={"url": url}, headers=api.admin)
        if r.status_code != 422 or r.json().get("code") != "validation_failed":
            wrong.append((url, r.status_code, r.text[:200]))
    assert wrong == []
    assert await guarded.db_count(WebhookEndpoint) == 0
    listed = await api.http.get(f"{guarded.base}/webhooks", headers=api.admin)
    assert listed.json()["items"] == []
    body = problem(
        await api.http.post(
            f"{guarded.base}/webhooks",
            json={"url": "http://169.254.169.254/latest/meta-data"},
            headers=api.admin,
        ),
        422,
        "validation_failed",
    )
    assert [e["field"] for e in body["errors"]] == ["url"]


@SQLITE_ONLY
async def test_ssrf_guard_applies_to_patch_too(
    guarded: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = guarded.api
    _pretend_public(monkeypatch, "hooks.example.test")
    created = await guarded.create(url=f"http://hooks.example.test:{guarded.rx.port}/hook")
    for url in ("http://127.0.0.1/", "http://[::1]/", "http://10.1.2.3/x"):
        r = await api.http.patch(
            f"{guarded.base}/webhooks/{created['id']}", json={"url": url}, headers=api.admin
        )
        problem(r, 422, "validation_failed")
    shown = await api.http.get(f"{guarded.base}/webhooks/{created['id']}", headers=api.admin)
    assert shown.json()["url"] == created["url"]


def _pretend_public(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``name`` resolve to 127.0.0.1 but look public to the guard.

    Stands in for a public DNS name (the test has no internet): the guard's address
    check still runs for every other host, and ``name`` itself is unknown to the
    system resolver, so a request reaches the receiver only if the delivery connects
    to the address the guard returned (no second lookup).
    """

    async def fake(url: str, *, allow_private: bool) -> list[Any]:
        if httpx.URL(url).host == name:
            return [ipaddress.ip_address("127.0.0.1")]
        return await real_resolve(url, allow_private=allow_private)

    # Both the registration check and the delivery use the guard's resolve().
    assert getattr(services_module, "resolve") is real_resolve  # noqa: B009
    assert getattr(delivery_module, "resolve") is real_resolve  # noqa: B009
    monkeypatch.setattr(services_module, "resolve", fake)
    monkeypatch.setattr(delivery_module, "resolve", fake)


@SQLITE_ONLY
async def test_delivery_connects_to_the_checked_address_with_the_original_host(
    guarded: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend_public(monkeypatch, "hooks.example.test")
    url = f"http://hooks.example.test:{guarded.rx.port}/hook?source=tellback"
    created = await guarded.create(url=url)
    await guarded.api.feedback(guarded.user)
    await guarded.run_jobs()
    [req] = guarded.rx.received()
    assert req.path == "/hook?source=tellback"
    assert req.headers["host"] == f"hooks.example.test:{guarded.rx.port}"
    verify(created["secret"], req)
    assert (await guarded.only_delivery())["status"] == "succeeded"


@SQLITE_ONLY
async def test_each_host_name_has_connections_of_its_own(
    guarded: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery connects to the address it checked, so its pool would be keyed by that
    address: a connection whose TLS certificate was verified for one name could carry a
    request for another name on the same address. Each name gets a client of its own;
    past MAX_CLIENTS names the least recently used is retired, then closed."""
    state = guarded.api.state
    monkeypatch.setattr(delivery_module, "MAX_CLIENTS", 2)
    # (closed at the next call, not a deadline and a margin later)
    margin = -guarded.api.state.settings.webhook_timeout_seconds
    monkeypatch.setattr(delivery_module, "RETIRE_MARGIN_S", margin)
    a = await delivery_module.http_client(state, "a.example.test")
    b = await delivery_module.http_client(state, "b.example.test")
    assert a is not b
    assert await delivery_module.http_client(state, "a.example.test") is a
    await delivery_module.http_client(state, "c.example.test")  # b is the least recent
    assert not b.is_closed  # (a send it carries may still be under way)
    await delivery_module.http_client(state, "a.example.test")
    assert b.is_closed
    assert not a.is_closed
    assert await delivery_module.http_client(state, "b.example.test") is not b
    await delivery_module.close_http_client(state)
    assert a.is_closed


async def test_ssrf_guard_rechecks_at_delivery_time(
    database_url: str, tmp_path: Path, rx: WebhookReceiver
) -> None:
    data_dir = tmp_path / "data"
    permissive = make_settings(database_url, data_dir, webhook_allow_private=True)
    async with serve_app(permissive, build_registry()) as api:
        hooks = await _hooks(api, rx)
        created = await hooks.create()
        await api.feedback(hooks.user)
    # The operator turns private addresses off (or DNS now points inside): the queued
    # delivery must not reach the receiver.
    strict = make_settings(database_url, data_dir, webhook_timeout_seconds=PATIENT_S)
    async with serve_app(strict, build_registry()) as api:
        hooks = Hooks(api, rx, hooks.app, hooks.user, hooks.agent)
        await hooks.run_jobs()
        assert rx.requests == []
        [item] = await hooks.deliveries()
        assert item["status"] == "pending"
        assert item["last_status_code"] is None
        d = await hooks.delivery(item["id"])
        [attempt] = d["attempt_log"]
        assert attempt["status_code"] is None
        assert attempt["error"]
        assert "127.0.0.1" in attempt["error"] or "refused" in attempt["error"]
        # Retried later, still refused.
        await hooks.fast_forward()
        await hooks.run_jobs()
        assert rx.requests == []
        assert (await hooks.delivery(item["id"]))["attempts"] == 2
        # The endpoint itself is still listed (the operator can fix or remove it).
        shown = await api.http.get(f"{hooks.base}/webhooks/{created['id']}", headers=api.admin)
        assert shown.status_code == 200


# ----- 8/9. redirects and huge answers ---------------------------------------------------


async def test_redirects_are_not_followed(hooks: Hooks) -> None:
    await hooks.create()
    hooks.rx.then(Reply(redirect_to="/elsewhere"), path="/hook")
    await hooks.api.feedback(hooks.user)
    await hooks.run_jobs()
    assert [r.path for r in hooks.rx.requests] == ["/hook"]
    assert hooks.rx.received("/elsewhere") == []
    [item] = await hooks.deliveries()
    assert item["status"] == "pending"
    assert item["last_status_code"] == 302
    assert item["last_error"]
    d = await hooks.delivery(item["id"])
    assert d["attempt_log"][0]["status_code"] == 302
    assert d["delivered_at"] is None


def _collect_first() -> None:
    """A timed section starts after a full garbage collection. Late in the whole suite
    the test process holds a large heap, and a full collection inside the section can
    take the better part of a second: the likely cause of the one CI run in which this
    section took 1.1 s against its 0.9 s bound while the HTTP attempt took 4 ms (not
    reproduced alone or under CPU load)."""
    gc.collect()


@SQLITE_ONLY
async def test_only_an_excerpt_of_a_huge_answer_is_read(tight: Hooks) -> None:
    hooks = tight
    await hooks.create()
    size = 8 * 1024 * 1024
    hooks.rx.then(Reply(status=500, stream_bytes=size), Reply(status=200, endless=True))
    await hooks.api.feedback(hooks.user)
    _collect_first()
    started = time.monotonic()
    await hooks.run_jobs()
    assert time.monotonic() - started < TIMEOUT_S * 0.9
    [item] = await hooks.deliveries()
    d = await hooks.delivery(item["id"])
    [attempt] = d["attempt_log"]
    assert attempt["status_code"] == 500
    assert attempt["response_excerpt"]
    assert set(attempt["response_excerpt"]) == {"x"}
    assert len(attempt["response_excerpt"].encode()) <= 1024 + 16
    assert attempt["duration_ms"] < TIMEOUT_S * 1000

    # An answer that never ends: the 200 still counts, quickly, and the rest is not read.
    await hooks.fast_forward()
    _collect_first()
    started = time.monotonic()
    await hooks.run_jobs()
    assert time.monotonic() - started < TIMEOUT_S * 0.9
    d = await hooks.delivery(item["id"])
    assert d["status"] == "succeeded"
    last = d["attempt_log"][-1]
    assert last["status_code"] == 200
    assert len(last["response_excerpt"].encode()) <= 1024 + 16
    await asyncio.sleep(0.2)
    assert hooks.rx.streamed_bytes < size + 16 * 1024 * 1024


# ----- 10. transactional outbox, disable, delete -----------------------------------------


async def test_failed_or_replayed_requests_queue_no_delivery(hooks: Hooks) -> None:
    api = hooks.api
    await hooks.create()
    # Invalid feedback (422): no event, no delivery, no job.
    for body in ({"body": ""}, {"body": "x", "attachment_ids": ["not-an-upload"]}):
        r = await api.http.post("/v1/client/conversations", json=body, headers=hooks.user)
        assert r.status_code in {400, 404, 422}, r.text
    # A reply to a conversation the agent cannot see.
    r = await api.http.post(
        "/v1/agent/conversations/01a2151d-0000-7000-8000-000000000000/messages",
        json={"body": "hi"},
        headers=hooks.agent,
    )
    assert r.status_code == 404, r.text
    assert await hooks.db_count(Event) == 0
    assert await hooks.db_count(WebhookDelivery) == 0
    assert await hooks.deliveries() == []
    assert await hooks.run_jobs() == 0

    # The same Idempotency-Key twice: one conversation, one event, one delivery.
    headers = {**hooks.user, "Idempotency-Key": "feedback-1"}
    first = await api.http.post("/v1/client/conversations", json={"body": "a"}, headers=headers)
    again = await api.http.post("/v1/client/conversations", json={"body": "a"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert len(await hooks.deliveries()) == 1
    await hooks.run_jobs()
    assert len(hooks.rx.received()) == 1


async def test_an_endpoint_registered_while_a_session_is_trusted_hears_its_next_feedback(
    hooks: Hooks,
) -> None:
    """The session's check, kept for a few seconds, saw an app without webhooks; on
    PostgreSQL a new feedback then goes in one statement without reading the endpoints,
    which writes only if the app still has none. One registered meanwhile (on another
    process, whose notice has not come) still gets the feedback, keyed or not, once."""
    api = hooks.api
    before = await api.http.post(
        "/v1/client/conversations", json={"body": "before"}, headers=hooks.user
    )
    assert before.status_code == 201, before.text  # the session's check is kept now
    await hooks.create()
    keyed = {**hooks.user, "Idempotency-Key": "after-endpoint"}
    sent = []
    for headers in (hooks.user, keyed, keyed):
        r = await api.http.post("/v1/client/conversations", json={"body": "after"}, headers=headers)
        assert r.status_code == 201, r.text
        sent.append(r)
    assert sent[2].headers.get("Idempotent-Replayed") == "true"
    assert sent[2].json()["id"] == sent[1].json()["id"]
    deliveries = await hooks.deliveries()
    assert sorted(d["event_type"] for d in deliveries) == ["conversation.created"] * 2
    await hooks.run_jobs()
    delivered = [json.loads(req.body)["data"] for req in hooks.rx.received()]
    assert sorted(d["conversation"]["id"] for d in delivered) == sorted(
        r.json()["id"] for r in sent[:2]
    )


async def test_deleting_an_endpoint_removes_its_deliveries(hooks: Hooks) -> None:
    api = hooks.api
    gone = await hooks.create(url=hooks.rx.url("/gone"))
    kept = await hooks.create(url=hooks.rx.url("/kept"))
    hooks.rx.status(500, times=2)
    await api.feedback(hooks.user)
    await hooks.run_jobs()
    items = await hooks.deliveries()
    assert len(items) == 2
    gone_item = next(i for i in items if i["endpoint_id"] == gone["id"])
    assert await hooks.db_count(WebhookAttempt) == 2

    r = await api.http.delete(f"{hooks.base}/webhooks/{gone['id']}", headers=api.admin)
    assert r.status_code == 204, r.text
    r = await api.http.get(f"{hooks.base}/webhooks/{gone['id']}", headers=api.admin)
    problem(r, 404, "not_found")
    r = await api.http.get(f"{hooks.base}/webhook-deliveries/{gone_item['id']}", headers=api.admin)
    problem(r, 404, "not_found")
    assert [i["endpoint_id"] for i in await hooks.deliveries()] == [kept["id"]]
    assert await hooks.deliveries(webhook_id=gone["id"]) == []
    async with api.state.db.session(write=False) as db:
        left = await db.scalar(
            select(func.count())
            .select_from(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == gone_item["id"])
        )
    assert left == 0
    assert await hooks.db_count(WebhookDelivery) == 1

    # The orphaned retry job ends quietly; the other endpoint still gets its retry.
    await hooks.fast_forward()
    async with api.state.db.session(write=True) as db:
        await db.execute(
            update(Job).where(Job.kind == JOB_KIND).values(run_after=dt.datetime.now(dt.UTC))
        )
    before = len(hooks.rx.received("/gone"))
    await hooks.run_jobs()
    assert len(hooks.rx.received("/gone")) == before
    assert len(hooks.rx.received("/kept")) == 2
    async with api.state.db.session(write=False) as db:
        statuses = set(await db.scalars(select(Job.status).where(Job.kind == JOB_KIND)))
    assert statuses == {"done"}
    r = await api.http.delete(f"{hooks.base}/webhooks/{gone['id']}", headers=api.admin)
    problem(r, 404, "not_found")


async def test_disabled_endpoint_gets_nothing_and_pending_deliveries_fail(hooks: Hooks) -> None:
    api = hooks.api
    created = await hooks.create()
    hooks.rx.status(500)
    await api.feedback(hooks.user)
    await hooks.run_jobs()
    [pending] = await hooks.deliveries()
    assert pending["status"] == "pending"

    r = await api.http.patch(
        f"{hooks.base}/webhooks/{created['id']}", json={"enabled": False}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["enabled"] is False
    # New events: no delivery at all.
    await api.feedback(hooks.user)
    assert len(await hooks.deliveries()) == 1
    # The pending one ends as failed without another request.
    await hooks.fast_forward()
    await hooks.run_jobs()
    assert len(hooks.rx.received()) == 1
    d = await hooks.delivery(pending["id"])
    assert d["status"] == "failed"
    assert d["attempt_log"][-1]["error"]

    # Enabled again: new events flow; the failed one can be replayed by hand.
    r = await api.http.patch(
        f"{hooks.base}/webhooks/{created['id']}", json={"enabled": True}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    await api.feedback(hooks.user)
    await hooks.run_jobs()
    assert len(hooks.rx.received()) == 2
    r = await api.http.post(
        f"{hooks.base}/webhook-deliveries/{pending['id']}/replay", headers=api.admin
    )
    assert r.status_code == 202, r.text
    await hooks.run_jobs()
    assert len(hooks.rx.received()) == 3
    assert hooks.rx.received()[-1].headers["webhook-id"] == pending["event_id"]
    verify(created["secret"], hooks.rx.received()[-1])


async def test_another_apps_endpoint_hears_nothing(hooks: Hooks) -> None:
    """Another app's endpoint never hears this app's events."""
    api = hooks.api
    other = await api.create_app("Other")
    r = await api.http.post(
        f"/v1/admin/apps/{other.id}/webhooks",
        json={"url": hooks.rx.url("/other")},
        headers=api.admin,
    )
    assert r.status_code == 201, r.text
    await hooks.create(url=hooks.rx.url("/mine"))
    await api.feedback(hooks.user)
    await hooks.run_jobs()
    assert hooks.rx.received("/other") == []
    assert len(hooks.rx.received("/mine")) == 1
    r = await api.http.get(f"/v1/admin/apps/{other.id}/webhook-deliveries", headers=api.admin)
    assert r.json()["items"] == []


# ----- 11. admin API validation ----------------------------------------------------------


@SQLITE_ONLY
async def test_admin_api_validation_and_isolation(hooks: Hooks) -> None:
    api = hooks.api
    base = hooks.base
    for bad in (
        {"url": hooks.rx.url(), "events": ["conversation.deleted"]},
        {"url": hooks.rx.url(), "events": ["unread.changed"]},
        {"url": hooks.rx.url(), "events": "message.created"},
        {"url": ""},
        {"events": ["message.created"]},
        {"url": "http://127.0.0.1/" + "a" * 3000},
    ):
        r = await api.http.post(f"{base}/webhooks", json=bad, headers=api.admin)
        problem(r, 422, "validation_failed")
    assert await hooks.db_count(WebhookEndpoint) == 0

    created = await hooks.create(events=["message.created", "conversation.created"])
    r = await api.http.patch(
        f"{base}/webhooks/{created['id']}", json={"events": ["nope"]}, headers=api.admin
    )
    problem(r, 422, "validation_failed")
    r = await api.http.post(
        f"{base}/webhooks/{created['id']}/rotate-secret",
        json={"overlap_seconds": -1},
        headers=api.admin,
    )
    problem(r, 422, "validation_failed")

    # No token / wrong token: 401 everywhere.
    wid = created["id"]
    for method, path in (
        ("POST", f"{base}/webhooks"),
        ("GET", f"{base}/webhooks"),
        ("GET", f"{base}/webhooks/{wid}"),
        ("PATCH", f"{base}/webhooks/{wid}"),
        ("DELETE", f"{base}/webhooks/{wid}"),
        ("POST", f"{base}/webhooks/{wid}/rotate-secret"),
        ("GET", f"{base}/webhook-deliveries"),
    ):
        for headers in ({}, api.bearer("tb_admin_wrong"), hooks.agent):
            r = await api.http.request(method, path, json={"url": hooks.rx.url()}, headers=headers)
            assert r.status_code in {401, 403}, (method, path, r.status_code, r.text)
            if not headers:
                problem(r, 401, "unauthenticated")
    assert (await api.http.get(f"{base}/webhooks/{wid}", headers=api.admin)).status_code == 200

    # Another app's webhook or delivery: 404, never leaked or changed.
    other = await api.create_app("Other")
    obase = f"/v1/admin/apps/{other.id}"
    await api.feedback(hooks.user)
    [item] = await hooks.deliveries()
    await hooks.run_jobs()
    for method, path, body in (
        ("GET", f"{obase}/webhooks/{wid}", None),
        ("PATCH", f"{obase}/webhooks/{wid}", {"enabled": False}),
        ("DELETE", f"{obase}/webhooks/{wid}", None),
        ("POST", f"{obase}/webhooks/{wid}/rotate-secret", {}),
        ("GET", f"{obase}/webhook-deliveries/{item['id']}", None),
        ("POST", f"{obase}/webhook-deliveries/{item['id']}/replay", None),
        ("GET", f"{base}/webhooks/01a2151d-0000-7000-8000-000000000000", None),
        ("GET", "/v1/admin/apps/01a2151d-0000-7000-8000-000000000000/webhooks", None),
    ):
        r = await api.http.request(method, path, json=body, headers=api.admin)
        problem(r, 404, "not_found")
    r = await api.http.get(f"{obase}/webhooks", headers=api.admin)
    assert r.json()["items"] == []
    r = await api.http.get(f"{obase}/webhook-deliveries", headers=api.admin)
    assert r.json()["items"] == []
    shown = (await api.http.get(f"{base}/webhooks/{wid}", headers=api.admin)).json()
    assert shown["enabled"] is True
    assert shown["previous_secret_expires_at"] is None
    assert len(hooks.rx.received()) == 1  # the replay under the wrong app sent nothing
    verify(created["secret"], hooks.rx.received()[0])  # the secret was not rotated


@SQLITE_ONLY
async def test_idempotent_create_replays_the_same_secret(hooks: Hooks) -> None:
    api = hooks.api
    headers = {**api.admin, "Idempotency-Key": "add-crm-hook"}
    body = {"url": hooks.rx.url(), "events": ["message.created"]}
    first = await api.http.post(f"{hooks.base}/webhooks", json=body, headers=headers)
    second = await api.http.post(f"{hooks.base}/webhooks", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert second.json() == first.json()
    assert second.json()["secret"] == first.json()["secret"]
    assert await hooks.db_count(WebhookEndpoint) == 1
    # The stored replay holds the secret sealed, not in the clear.
    from tellback_server.db.models import IdempotencyKey

    async with api.state.db.session(write=False) as db:
        stored = list(await db.scalars(select(IdempotencyKey.response_body)))
    secret = first.json()["secret"]
    assert stored
    assert all(secret.encode() not in (s or b"") for s in stored)
    # Same key, different body: 409.
    other = await api.http.post(
        f"{hooks.base}/webhooks", json={"url": hooks.rx.url("/x")}, headers=headers
    )
    problem(other, 409, "idempotency_key_reused")
    assert await hooks.db_count(WebhookEndpoint) == 1


async def test_delivery_log_pagination_newest_first(hooks: Hooks) -> None:
    await hooks.create()
    convs = [await hooks.api.feedback(hooks.user, body=f"report {i}") for i in range(5)]
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        r = await hooks.api.http.get(
            f"{hooks.base}/webhook-deliveries", params=params, headers=hooks.api.admin
        )
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 2
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5
    assert len({d["id"] for d in seen}) == 5
    event_ids = [int(d["event_id"]) for d in seen]
    assert event_ids == sorted(event_ids, reverse=True)
    payload_ids = []
    for d in seen:
        detail = await hooks.delivery(d["id"])
        payload_ids.append(detail["payload"]["data"]["conversation"]["id"])
    assert payload_ids == [c["id"] for c in reversed(convs)]


async def test_erasing_a_user_drops_their_pending_deliveries(hooks: Hooks) -> None:
    api = hooks.api
    await hooks.create()
    hooks.rx.status(500)
    await api.feedback(hooks.user, body="my phone number is 555-0100")
    await hooks.run_jobs()
    [item] = await hooks.deliveries()
    assert item["status"] == "pending"
    user_id = (await hooks.delivery(item["id"]))["payload"]["data"]["conversation"]["end_user"][
        "id"
    ]
    r = await api.http.delete(f"{hooks.base}/users/{user_id}", headers=api.admin)
    assert r.status_code == 204, r.text
    assert await hooks.deliveries() == []
    async with api.state.db.session(write=True) as db:
        await db.execute(
            update(Job).where(Job.kind == JOB_KIND).values(run_after=dt.datetime.now(dt.UTC))
        )
    await hooks.run_jobs()
    assert len(hooks.rx.received()) == 1  # the erased user's data is not sent again


# ----- found by these tests (fixed) ------------------------------------------------------


async def test_answer_with_a_nul_byte_is_recorded_as_delivered(hooks: Hooks) -> None:
    await hooks.create()
    hooks.rx.then(Reply(status=200, body=b'{"ok":true}\x00'))
    await hooks.api.feedback(hooks.user)
    await hooks.run_jobs()
    await hooks.fast_forward()
    await hooks.run_jobs()
    assert len(hooks.rx.received()) == 1  # delivered once: no resend of an accepted event
    [item] = await hooks.deliveries()
    assert item["status"] == "succeeded"
    assert item["attempts"] == 1
    d = await hooks.delivery(item["id"])
    assert d["attempt_log"][0]["status_code"] == 200


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_concurrent_replays_queue_one_round(hooks: Hooks) -> None:
    api = hooks.api
    await hooks.create()
    await api.feedback(hooks.user)
    await hooks.run_jobs()
    [item] = await hooks.deliveries()
    assert item["status"] == "succeeded"
    path = f"{hooks.base}/webhook-deliveries/{item['id']}/replay"

    # Hold the delivery row briefly (as a concurrent writer would) so that both replay
    # requests have read the row before either commits: the race made deterministic.
    async with api.state.db.session(write=True) as db:
        await db.execute(
            select(WebhookDelivery.id).where(WebhookDelivery.id == item["id"]).with_for_update()
        )
        tasks = [asyncio.create_task(api.http.post(path, headers=api.admin)) for _ in range(2)]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(t.done() for t in tasks):
            async with api.state.db.session(write=False) as probe:
                waiting = await probe.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            if waiting and waiting >= 2:
                break
            await asyncio.sleep(0.05)
    results = await asyncio.gather(*tasks)
    codes = sorted(r.status_code for r in results)
    async with api.state.db.session(write=False) as db:
        queued = await db.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.kind == JOB_KIND, Job.status == "queued")
        )
    await hooks.run_jobs()
    assert codes == [202, 409], [r.text for r in results]
    assert queued == 1
    assert len(hooks.rx.received()) == 2
