"""Push delivery end to end: the real aioapns and pyfcm clients against local fakes."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from tellback_server.db.base import table_of
from tellback_server.db.models import Device, Job, Message
from tellback_server.dev.apns_fake import ApnsFake
from tellback_server.dev.fcm_fake import FcmFake
from tellback_server.domain.push import providers
from tellback_server.jobs.worker import Worker
from tellback_server.plugins import build_registry
from tests.server.conftest import Api, AppInfo, identity_token, make_settings, serve_app

TOPIC = "com.example.feedback"
TEAM = "TEAM123456"


@dataclass
class Push:
    api: Api
    apns: ApnsFake
    fcm: FcmFake
    app: AppInfo
    user: dict[str, str]
    agent: dict[str, str]
    agent_id: str

    async def run_jobs(self) -> int:
        return await Worker(self.api.state, build_registry()).run_until_idle()

    async def set_apns(self, key_id: str | None = None) -> None:
        private_pem, public_pem = ApnsFake.generate_key()
        key_id = key_id or ApnsFake.generate_key_id()
        self.apns.add_key(TEAM, key_id, public_pem)
        r = await self.api.http.put(
            f"/v1/admin/apps/{self.app.id}/push/apns",
            json={"team_id": TEAM, "key_id": key_id, "private_key": private_pem, "topic": TOPIC},
            headers=self.api.admin,
        )
        assert r.status_code == 200, r.text

    async def set_fcm(self) -> None:
        r = await self.api.http.put(
            f"/v1/admin/apps/{self.app.id}/push/fcm",
            json={"service_account": self.fcm.service_account("tellback-test")},
            headers=self.api.admin,
        )
        assert r.status_code == 200, r.text

    async def register(self, headers: dict[str, str], provider: str = "apns", **extra: Any) -> str:
        token = ApnsFake.make_token() if provider == "apns" else FcmFake.make_token()
        body = {
            "platform": "ios" if provider == "apns" else "android",
            "push_provider": provider,
            "push_token": token,
            **extra,
        }
        path = (
            "/v1/agent/devices/current" if headers is self.agent else "/v1/client/devices/current"
        )
        r = await self.api.http.put(path, json=body, headers=headers)
        assert r.status_code == 200, r.text
        return token

    async def add_agent_phones(self, tokens: list[str], provider: str = "apns") -> None:
        """Many phones of the agent at once, written directly (a register each is slow)."""
        async with self.api.state.db.session(write=True) as db:
            db.add_all(
                Device(
                    app_id=uuid.UUID(self.app.id),
                    owner_key=f"agent:{self.agent_id}:p{i}",
                    agent_id=uuid.UUID(self.agent_id),
                    platform="ios" if provider == "apns" else "android",
                    provider=provider,
                    token=token,
                    apns_environment="production" if provider == "apns" else None,
                    active=True,
                )
                for i, token in enumerate(tokens)
            )

    async def reply(self, conversation_id: str, body: str = "Fixed in 2.3.2") -> dict[str, Any]:
        r = await self.api.http.post(
            f"/v1/agent/conversations/{conversation_id}/messages",
            json={"body": body},
            headers=self.agent,
        )
        assert r.status_code == 201, r.text
        data: dict[str, Any] = r.json()
        return data

    async def deliveries(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else {}
        r = await self.api.http.get(
            f"/v1/admin/apps/{self.app.id}/push-deliveries", params=params, headers=self.api.admin
        )
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        return items


@pytest.fixture
async def push(database_url: str, tmp_path: Path) -> AsyncIterator[Push]:
    async with ApnsFake(topics=[TOPIC]) as apns, FcmFake() as fcm:
        settings = make_settings(
            database_url,
            tmp_path / "data",
            apns_host="127.0.0.1",
            apns_port=apns.port,
            apns_ca_file=Path(apns.ca_file),
            fcm_endpoint=fcm.base_url,
        )
        async with serve_app(settings, build_registry()) as api:
            app = await api.create_app("Feedback Demo")
            user = await api.user_headers(app)
            agent_id, agent = await api.create_agent(app)
            yield Push(api, apns, fcm, app, user, agent, agent_id)


async def test_agent_reply_reaches_the_users_iphone(push: Push) -> None:
    await push.set_apns()
    token = await push.register(push.user, apns_environment="sandbox")
    conv = await push.api.feedback(push.user, body="The checkout button does nothing")
    reply = await push.reply(conv["id"], "Thanks! Fixed in 2.3.2.")
    await push.run_jobs()
    assert push.apns.received_count == 1
    note = push.apns.received[0]
    assert note.token == token
    assert note.headers["apns-push-type"] == "alert"
    assert note.headers["apns-topic"] == TOPIC
    assert note.headers["apns-collapse-id"] == reply["id"]
    assert int(note.headers["apns-expiration"]) > dt.datetime.now(dt.UTC).timestamp() + 3600
    assert note.payload == {
        "aps": {
            "alert": {"title": "Ada", "body": "Thanks! Fixed in 2.3.2."},
            "badge": 1,
            "sound": "default",
            "thread-id": conv["id"],
        },
        "tellback": {
            "type": "message.created",
            "conversation_id": conv["id"],
            "message_id": reply["id"],
        },
    }
    sent = await push.deliveries("sent")
    assert len(sent) == 1
    assert sent[0]["provider"] == "apns"
    assert sent[0]["http_status"] == 200
    assert sent[0]["latency_ms"] > 0


async def test_the_users_badge_counts_unread_replies_across_their_conversations(
    push: Push,
) -> None:
    """A reply's badge is the end user's unread replies in all their conversations,
    as they stand when the push goes out; reading a conversation takes its own off."""
    await push.set_apns()
    await push.register(push.user)
    someone_else = await push.api.user_headers(push.app)  # their unread is not counted
    await push.reply((await push.api.feedback(someone_else))["id"])
    first = await push.api.feedback(push.user, body="one")
    second = await push.api.feedback(push.user, body="two")
    badges, last = [], {}
    for conv in (first, second, first):
        last[conv["id"]] = (await push.reply(conv["id"]))["id"]
        await push.run_jobs()
        badges.append(push.apns.received[-1].payload["aps"]["badge"])
    assert badges == [1, 2, 3]
    r = await push.api.http.post(
        f"/v1/client/conversations/{first['id']}/read",
        json={"up_to_message_id": last[first["id"]]},
        headers=push.user,
    )
    assert r.status_code == 204, r.text
    await push.reply(second["id"])
    await push.run_jobs()
    assert push.apns.received[-1].payload["aps"]["badge"] == 2


async def test_only_devices_whose_provider_the_app_configured_are_sent_to(push: Push) -> None:
    """An app with APNs credentials and none for FCM: the user's iPhone gets the reply,
    their Android phone is recorded as skipped with the reason, and nothing reaches FCM."""
    await push.set_apns()
    signed = identity_token(push.app.identity_secret, "sam", kid=push.app.identity_kid)
    on_iphone, on_android = [
        await push.api.user_headers(push.app, user_token=signed) for _ in range(2)
    ]  # one user, two installations
    iphone = await push.register(on_iphone)
    await push.register(on_android, provider="fcm")
    conv = await push.api.feedback(on_iphone)
    await push.reply(conv["id"])
    await push.run_jobs()
    assert [n.token for n in push.apns.received] == [iphone]
    assert push.fcm.received_count == 0
    skipped = await push.deliveries("skipped")
    assert [(d["provider"], d["reason"]) for d in skipped] == [
        ("fcm", "the app has no FCM credentials")
    ]


async def test_android_gets_fcm_with_string_data(push: Push) -> None:
    await push.set_fcm()
    token = await push.register(push.user, provider="fcm")
    conv = await push.api.feedback(push.user)
    reply = await push.reply(conv["id"])
    await push.run_jobs()
    assert push.fcm.received_count == 1
    msg = push.fcm.received[0]
    assert msg.token == token
    assert msg.notification == {"title": "Ada", "body": "Fixed in 2.3.2"}
    assert msg.data == {
        "type": "message.created",
        "conversation_id": conv["id"],
        "message_id": reply["id"],
        "badge": "1",
    }
    assert all(isinstance(v, str) for v in msg.data.values())


async def test_new_feedback_reaches_the_agents_phone(push: Push) -> None:
    await push.set_apns()
    await push.register(push.agent)
    conv = await push.api.feedback(push.user, body="Crash on launch")
    await push.run_jobs()
    assert push.apns.received_count == 1
    payload = push.apns.received[0].payload
    assert payload["tellback"]["type"] == "conversation.created"
    assert payload["tellback"]["conversation_id"] == conv["id"]
    assert payload["aps"]["alert"] == {
        "title": "New feedback in Feedback Demo",
        "body": "Crash on launch",
    }
    assert payload["aps"]["badge"] == 1


async def test_a_late_push_keeps_the_kind_its_message_had(push: Push) -> None:
    """The push for new feedback runs after the user's follow-up (a backlog, a retry):
    it still says new feedback, and the follow-up's says reply."""
    await push.set_apns()
    await push.register(push.agent)
    conv = await push.api.feedback(push.user, body="Crash on launch")
    r = await push.api.http.post(
        f"/v1/client/conversations/{conv['id']}/messages",
        json={"body": "Still crashing"},
        headers={**push.user, "Idempotency-Key": str(uuid.uuid4())},
    )
    assert r.status_code == 201, r.text
    await push.run_jobs()  # both jobs run now, after both messages
    kinds = {
        n.payload["aps"]["alert"]["body"]: n.payload["tellback"]["type"] for n in push.apns.received
    }
    assert kinds == {"Crash on launch": "conversation.created", "Still crashing": "message.created"}
    titles = sorted(n.payload["aps"]["alert"]["title"] for n in push.apns.received)
    assert titles == ["New feedback in Feedback Demo", "Reply from a user"]


async def test_each_agents_badge_counts_the_conversations_to_read_in_their_own_apps(
    push: Push,
) -> None:
    """Ada serves the app; Bo serves it and a second app with two unread conversations.
    New feedback in the app (its second unread one) reaches both phones, each with the
    unread conversations of the apps that agent serves: 2 for Ada, 4 for Bo."""
    await push.set_apns()
    other = await push.api.create_app("Second App")
    _, bo = await push.api.create_agent(push.app, other, name="Bo")
    ada_phone = await push.register(push.agent)
    bo_phone = ApnsFake.make_token()
    r = await push.api.http.put(
        "/v1/agent/devices/current",
        json={
            "platform": "ios",
            "push_provider": "apns",
            "push_token": bo_phone,
            "app_id": push.app.id,  # (whose credentials reach the phone)
        },
        headers=bo,
    )
    assert r.status_code == 200, r.text
    other_user = await push.api.user_headers(other)
    for _ in range(2):
        await push.api.feedback(other_user)  # (no APNs credentials in that app)
    await push.api.feedback(push.user)
    await push.run_jobs()
    push.apns.received.clear()
    await push.api.feedback(push.user, body="second")
    await push.run_jobs()
    badges = {n.token: n.payload["aps"]["badge"] for n in push.apns.received}
    assert badges == {ada_phone: 2, bo_phone: 4}


async def _fanout_jobs(push: Push) -> int:
    async with push.api.state.db.session(write=False) as db:
        return len(list(await db.scalars(select(Job.id).where(Job.kind == "push.fanout"))))


async def test_a_message_no_device_can_hear_of_queues_no_job(push: Push) -> None:
    await push.set_apns()
    conv = await push.api.feedback(push.user)  # no agent phone registered
    await push.reply(conv["id"])  # the user has no device either
    assert await _fanout_jobs(push) == 0
    await push.register(push.agent)
    await push.api.feedback(push.user)
    assert await _fanout_jobs(push) == 1
    await push.register(push.user)
    await push.reply(conv["id"])
    assert await _fanout_jobs(push) == 2
    await push.run_jobs()
    assert push.apns.received_count == 2


async def test_content_free_mode_sends_no_message_text(push: Push) -> None:
    r = await push.api.http.patch(
        f"/v1/admin/apps/{push.app.id}",
        json={"settings": {"content_free_push": True}},
        headers=push.api.admin,
    )
    assert r.status_code == 200
    await push.set_apns()
    await push.register(push.user)
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"], "Your card number 4242 is blocked")
    await push.run_jobs()
    alert = push.apns.received[0].payload["aps"]["alert"]
    assert alert == {"title": "Feedback Demo", "body": "You have a new reply"}


async def test_without_credentials_the_delivery_is_skipped_with_a_reason(push: Push) -> None:
    await push.register(push.user)
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"])
    await push.run_jobs()
    assert push.apns.attempt_count == 0
    skipped = await push.deliveries("skipped")
    assert [d["reason"] for d in skipped] == ["the app has no APNS credentials"]


async def test_unregistered_token_deactivates_the_device(push: Push) -> None:
    await push.set_apns()
    token = await push.register(push.user)
    push.apns.unregister(token)
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"])
    await push.run_jobs()
    invalid = await push.deliveries("invalid_token")
    assert len(invalid) == 1
    assert invalid[0]["http_status"] == 410
    assert invalid[0]["reason"] == "Unregistered"
    await push.reply(conv["id"], "second reply")
    await push.run_jobs()
    assert push.apns.attempt_count == 1  # the deactivated device gets nothing more
    # registering again reactivates it
    r = await push.api.http.put(
        "/v1/client/devices/current",
        json={"platform": "ios", "push_provider": "apns", "push_token": ApnsFake.make_token()},
        headers=push.user,
    )
    assert r.json()["active"] is True


async def _make_due(api: Api) -> None:
    async with api.state.db.session(write=True) as db:
        await db.execute(
            update(Job).where(Job.status == "queued").values(run_after=dt.datetime.now(dt.UTC))
        )


async def test_apns_503_is_retried_then_delivered(push: Push) -> None:
    await push.set_apns()
    await push.register(push.user)
    push.apns.fail_next(503, "ServiceUnavailable")
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"])
    await push.run_jobs()
    assert push.apns.received_count == 0
    assert [d["status"] for d in await push.deliveries()] == ["retrying"]
    await _make_due(push.api)
    await push.run_jobs()
    assert push.apns.received_count == 1
    statuses = [d["status"] for d in await push.deliveries()]
    assert statuses == ["sent", "retrying"]


async def test_fcm_quota_retry_after_is_honoured(push: Push) -> None:
    await push.set_fcm()
    await push.register(push.user, provider="fcm")
    push.fcm.fail_next("QUOTA_EXCEEDED", retry_after=120)
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"])
    started = dt.datetime.now(dt.UTC)
    await push.run_jobs()
    async with push.api.state.db.session(write=False) as db:
        job = await db.scalar(select(Job).where(Job.kind == "push.send"))
    assert job is not None
    assert job.status == "queued"
    assert job.run_after >= started + dt.timedelta(seconds=119)


async def _jobs(push: Push, kind: str = "push.send") -> list[Job]:
    async with push.api.state.db.session(write=False) as db:
        return list(await db.scalars(select(Job).where(Job.kind == kind)))


async def _status(push: Push) -> dict[str, Any]:
    r = await push.api.http.get(f"/v1/admin/apps/{push.app.id}/push", headers=push.api.admin)
    assert r.status_code == 200, r.text
    status: dict[str, Any] = r.json()
    return status


async def test_rejected_credentials_show_on_the_app_and_the_push_waits_for_new_ones(
    push: Push, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tellback_server.domain.push import delivery

    monkeypatch.setattr(delivery, "CREDENTIALS_RECHECK_S", 0.0)  # (new ones seen at once)
    await push.set_apns()
    push.apns.remove_key(next(iter(push.apns._keys)))  # the key was revoked at Apple
    await push.register(push.user)
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"])
    await push.run_jobs()
    retrying = await push.deliveries("retrying")
    assert [(d["http_status"], d["reason"]) for d in retrying] == [(403, "InvalidProviderToken")]
    status = await _status(push)
    assert status["apns"]["configured"] is True
    assert status["apns"]["last_error"] == "InvalidProviderToken"
    assert "private_key" not in str(status)
    # Within a minute of the refusal, queued pushes wait without asking APNs again.
    await push.reply(conv["id"], "second")
    await _make_due(push.api)
    await push.run_jobs()
    assert push.apns.attempt_count == 1
    assert [j.status for j in await _jobs(push)] == ["queued", "queued"]
    assert [j.attempts for j in await _jobs(push)] == [0, 0]  # (waiting spends no attempt)
    # The operator uploads a new key: both pushes go out.
    await push.set_apns()
    await _make_due(push.api)
    await push.run_jobs()
    assert push.apns.received_count == 2
    assert [j.status for j in await _jobs(push)] == ["done", "done"]
    assert (await _status(push))["apns"]["last_error"] is None


async def test_a_push_outlives_an_outage_and_is_given_up_after_a_day(push: Push) -> None:
    await push.set_apns()
    await push.register(push.user)
    push.apns.fail_next(503, "ServiceUnavailable", count=None)
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"])
    await push.run_jobs()
    for _ in range(12):  # far more tries than the attempts a send job has
        await _make_due(push.api)
        await push.run_jobs()
    [job] = await _jobs(push)
    assert job.status == "queued"
    assert push.apns.attempt_count == 13
    async with push.api.state.db.session(write=True) as db:  # the reply is a day old
        await db.execute(
            update(Message)
            .where(Message.conversation_id == uuid.UUID(conv["id"]))
            .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=24, seconds=1))
        )
    await _make_due(push.api)
    await push.run_jobs()
    [job] = await _jobs(push)
    assert job.status == "failed"  # seen as such in the job metrics, not "done"
    assert "ServiceUnavailable" in str(job.last_error)
    assert (await push.deliveries())[0]["status"] == "failed"


async def test_a_retry_goes_only_to_whom_the_device_still_belongs(push: Push) -> None:
    """A retry queued for one end user's phone is not sent after a logout moved the
    device to a new anonymous user, nor to the phone of an agent disabled since."""
    await push.set_apns()
    installation = "install-shared-0001"
    signed = identity_token(push.app.identity_secret, "alice", kid=push.app.identity_kid)
    alice = await push.api.user_headers(push.app, installation_id=installation, user_token=signed)
    await push.register(alice)
    await push.register(push.agent)
    conv = await push.api.feedback(alice, body="my card was charged twice")
    push.apns.fail_next(503, "ServiceUnavailable", count=2)
    await push.run_jobs()  # the agent's push: 503
    await push.reply(conv["id"], "Alice, your refund for card 4242 is approved")
    await push.run_jobs()  # Alice's push: 503
    assert [j.status for j in await _jobs(push)] == ["queued", "queued"]
    await push.api.session(push.app, installation_id=installation)  # logout
    r = await push.api.http.patch(
        f"/v1/admin/agents/{push.agent_id}", json={"disabled": True}, headers=push.api.admin
    )
    assert r.status_code == 200, r.text
    await _make_due(push.api)
    await push.run_jobs()
    assert push.apns.received_count == 0
    assert [j.status for j in await _jobs(push)] == ["done", "done"]


async def test_a_token_registered_while_the_old_one_is_refused_stays_active(
    push: Push,
) -> None:
    await push.set_apns()
    old = await push.register(push.user)
    push.apns.unregister(old)
    push.apns.latency = 1.0
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"], "first")
    worker = asyncio.create_task(push.run_jobs())
    await asyncio.sleep(0.4)  # the send to the old token is in flight
    fresh = await push.register(push.user)
    await worker
    push.apns.latency = 0.0
    assert [d["status"] for d in await push.deliveries()] == ["invalid_token"]
    await push.reply(conv["id"], "second")
    await push.run_jobs()
    assert [n.token for n in push.apns.received] == [fresh]


async def test_recording_outcomes_keeps_the_apns_client_and_its_token(
    push: Push, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing when the credentials last delivered or failed is not a change of
    credentials: one connection and one provider token (Apple refuses a new token more
    often than every 20 minutes with 429 TooManyProviderTokenUpdates)."""
    from tellback_server.db.models import PushCredential
    from tellback_server.domain.push import delivery

    monkeypatch.setattr(delivery, "CREDENTIALS_RECHECK_S", 0.0)
    await push.set_apns()
    await push.register(push.user)
    conv = await push.api.feedback(push.user)
    for i in range(4):
        await push.reply(conv["id"], f"reply {i}")
        await push.run_jobs()
        async with push.api.state.db.session(write=True) as db:  # a minute later
            credentials = table_of(PushCredential)
            await db.execute(
                update(credentials).values(
                    last_success_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=61),
                    updated_at=credentials.c.updated_at,
                )
            )
    assert push.apns.received_count == 4
    assert len({n.headers.get("authorization") for n in push.apns.received}) == 1
    assert len({n.connection_id for n in push.apns.received}) == 1


async def test_a_topic_typo_deactivates_no_device(
    push: Push, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeviceTokenNotForTopic for every device says the app's topic is wrong, not that
    every token is: devices stay active, the status says so, and once the topic is
    fixed the waiting pushes go out."""
    from tellback_server.domain.push import delivery

    monkeypatch.setattr(delivery, "CREDENTIALS_RECHECK_S", 0.0)
    private_pem, public_pem = ApnsFake.generate_key()
    key_id = ApnsFake.generate_key_id()
    push.apns.add_key(TEAM, key_id, public_pem)
    credentials = {"team_id": TEAM, "key_id": key_id, "private_key": private_pem}
    r = await push.api.http.put(
        f"/v1/admin/apps/{push.app.id}/push/apns",
        json={**credentials, "topic": "com.example.feedbak"},
        headers=push.api.admin,
    )
    assert r.status_code == 200, r.text
    phones = [await push.api.user_headers(push.app) for _ in range(2)]
    for phone in phones:
        await push.register(phone)
        await push.reply((await push.api.feedback(phone))["id"])
    await push.run_jobs()
    assert [d["status"] for d in await push.deliveries()] == ["retrying", "retrying"]
    assert "check the app's topic" in (await _status(push))["apns"]["last_error"]
    r = await push.api.http.put(
        f"/v1/admin/apps/{push.app.id}/push/apns",
        json={**credentials, "topic": TOPIC},
        headers=push.api.admin,
    )
    assert r.status_code == 200, r.text
    await _make_due(push.api)
    await push.run_jobs()
    assert push.apns.received_count == 2


async def test_a_stray_token_is_deactivated_once_the_credentials_delivered(push: Push) -> None:
    """A token of another app (DeviceTokenNotForTopic) beside working ones: deactivated."""
    await push.set_apns()
    await push.register(push.user)
    stray = await push.api.user_headers(push.app)
    token = await push.register(stray)
    push.apns.fail_next(400, "DeviceTokenNotForTopic", token=token)
    await push.reply((await push.api.feedback(push.user))["id"])
    await push.run_jobs()  # the working phone proves the credentials
    await push.reply((await push.api.feedback(stray))["id"])
    await push.run_jobs()
    assert [d["status"] for d in await push.deliveries()] == ["invalid_token", "sent"]


async def test_an_fcm_404_that_is_not_unregistered_deactivates_no_device(
    push: Push, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 404 from a wrong endpoint (here a proxy path that does not exist)."""
    built = providers.FcmSender.__init__

    def wrong_path(sender: providers.FcmSender, info: dict[str, Any], settings: Any) -> None:
        built(sender, info, settings)
        sender.client.FCM_END_POINT_BASE = f"{settings.fcm_endpoint}/proxy/v1/projects"

    monkeypatch.setattr(providers.FcmSender, "__init__", wrong_path)
    await push.set_fcm()
    await push.register(push.user, provider="fcm")
    await push.reply((await push.api.feedback(push.user))["id"])
    await push.run_jobs()
    [delivery] = await push.deliveries()
    assert (delivery["status"], delivery["http_status"]) == ("retrying", 404)
    assert "check the app's Firebase project" in (await _status(push))["fcm"]["last_error"]
    async with push.api.state.db.session(write=False) as db:
        assert (await db.scalars(select(Device.active))).all() == [True]


async def test_an_unreachable_oauth_endpoint_is_waited_out_not_blamed_on_the_key(
    push: Push,
) -> None:
    info = push.fcm.service_account("tellback-test")
    info["token_uri"] = "http://127.0.0.1:9/token"  # nothing listens there
    r = await push.api.http.put(
        f"/v1/admin/apps/{push.app.id}/push/fcm",
        json={"service_account": info},
        headers=push.api.admin,
    )
    assert r.status_code == 200, r.text
    await push.register(push.user, provider="fcm")
    await push.reply((await push.api.feedback(push.user))["id"])
    await push.run_jobs()
    [delivery] = await push.deliveries()
    assert delivery["status"] == "retrying"
    assert delivery["reason"].startswith("cannot reach Google's token endpoint")
    assert (await _status(push))["fcm"]["last_error"] is None


async def test_a_hanging_fcm_leaves_the_default_threads_free(
    push: Push, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FCM's blocking sends have threads of their own: the default pool, which storage
    calls use, stays free while every FCM send hangs."""
    monkeypatch.setattr(providers, "SEND_TIMEOUT_S", 5.0)
    await push.set_fcm()
    await push.add_agent_phones([FcmFake.make_token() for _ in range(24)], "fcm")
    push.fcm.hang_next(count=None)
    await push.api.feedback(push.user, body="crash")
    worker = asyncio.create_task(push.run_jobs())
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await asyncio.to_thread(lambda: None)
    waited = time.monotonic() - started
    await worker
    assert waited < 2.5  # (sharing the default pool, it waited out a send: 5 s here)
    assert len(await push.deliveries("retrying")) == 24


async def test_push_outcomes_are_counted_on_metrics(push: Push) -> None:
    await push.set_apns()
    token = await push.register(push.user)
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"])
    await push.run_jobs()
    push.apns.unregister(token)
    await push.reply(conv["id"], "second")
    await push.run_jobs()
    text = (await push.api.http.get("/metrics")).text
    assert 'tellback_push_attempts_total{outcome="sent",provider="apns",reason="sent"} 1.0' in text
    assert (
        'tellback_push_attempts_total{outcome="invalid_token",provider="apns",'
        'reason="Unregistered"} 1.0'
    ) in text


async def test_an_answer_without_body_times_out_and_is_retried(
    push: Push, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(providers, "SEND_TIMEOUT_S", 0.5)
    await push.set_apns()
    await push.register(push.user)
    push.apns.fail_next_without_body(500)
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"])
    await push.run_jobs()
    retrying = await push.deliveries("retrying")
    assert len(retrying) == 1
    assert "no answer" in retrying[0]["reason"]


async def test_internal_notes_and_logged_out_users_get_nothing(push: Push) -> None:
    await push.set_apns()
    installation = "install-logout-0001"
    signed = identity_token(push.app.identity_secret, "user-42", kid=push.app.identity_kid)
    user = await push.api.user_headers(push.app, installation_id=installation, user_token=signed)
    await push.register(user)
    conv = await push.api.feedback(user)
    r = await push.api.http.post(
        f"/v1/agent/conversations/{conv['id']}/messages",
        json={"body": "note", "internal": True},
        headers=push.agent,
    )
    assert r.status_code == 201
    await push.run_jobs()
    assert push.apns.received_count == 0
    # logout: a new anonymous session on the same installation takes the device along
    await push.api.session(push.app, installation_id=installation)
    await push.reply(conv["id"])
    await push.run_jobs()
    assert push.apns.received_count == 0


async def test_a_token_moving_to_another_installation_leaves_the_old_one(push: Push) -> None:
    token = ApnsFake.make_token()
    body = {"platform": "ios", "push_provider": "apns", "push_token": token}
    other = await push.api.user_headers(push.app)
    assert (
        await push.api.http.put("/v1/client/devices/current", json=body, headers=push.user)
    ).status_code == 200
    assert (
        await push.api.http.put("/v1/client/devices/current", json=body, headers=other)
    ).status_code == 200
    await push.set_apns()
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"])
    await push.run_jobs()
    assert push.apns.received_count == 0  # the first user's installation no longer has it


async def test_bad_registrations_and_credentials_are_422(push: Push) -> None:
    r = await push.api.http.put(
        "/v1/client/devices/current",
        json={"platform": "android", "push_provider": "apns", "push_token": ApnsFake.make_token()},
        headers=push.user,
    )
    assert r.status_code == 422
    r = await push.api.http.put(
        f"/v1/admin/apps/{push.app.id}/push/apns",
        json={
            "team_id": TEAM,
            "key_id": "KEY1234567",
            "private_key": "-----BEGIN PRIVATE KEY-----\n" + "A" * 200,
            "topic": TOPIC,
        },
        headers=push.api.admin,
    )
    assert r.status_code == 422
    r = await push.api.http.put(
        f"/v1/admin/apps/{push.app.id}/push/fcm",
        json={"service_account": {"type": "user"}},
        headers=push.api.admin,
    )
    assert r.status_code == 422


async def test_a_fanout_to_many_stale_tokens_does_not_stall_the_connection(
    push: Push, monkeypatch: pytest.MonkeyPatch
) -> None:
    """~1,300 `410` bodies exhaust HTTP/2 flow control unless the client returns credit;
    then every later error on the connection would hang (aioapns never does it)."""
    monkeypatch.setattr(providers, "SEND_TIMEOUT_S", 3.0)
    await push.set_apns()
    stale = [ApnsFake.make_token() for _ in range(1500)]
    for token in stale:
        push.apns.unregister(token)
    await push.add_agent_phones(stale)
    await push.api.feedback(push.user, body="Crash on launch")
    await push.run_jobs()
    invalid = 0
    cursor = None
    while True:
        params = {
            "status": "invalid_token",
            "limit": "100",
            **({"cursor": cursor} if cursor else {}),
        }
        r = await push.api.http.get(
            f"/v1/admin/apps/{push.app.id}/push-deliveries", params=params, headers=push.api.admin
        )
        invalid += len(r.json()["items"])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert invalid == 1500
    assert await push.deliveries("retrying") == []


async def test_an_expired_provider_token_is_replaced_and_the_push_sent(push: Push) -> None:
    await push.set_apns()
    await push.register(push.user)
    conv = await push.api.feedback(push.user)
    await push.reply(conv["id"], "first")
    await push.run_jobs()
    assert push.apns.received_count == 1
    push.apns.token_max_age = 1.5  # Apple: 60 minutes; aioapns reuses its JWT for 30
    await asyncio.sleep(2.6)
    await push.reply(conv["id"], "second")
    await push.run_jobs()
    assert [a.reason for a in push.apns.attempts] == [None, "ExpiredProviderToken", None]
    assert push.apns.received_count == 2
    assert [d["status"] for d in await push.deliveries()] == ["sent", "sent"]
