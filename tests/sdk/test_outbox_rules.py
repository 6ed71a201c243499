"""Outbox rules: dead letters, retry/discard, messages behind queued conversations,
file copies, background flushing, and what stops a flush."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tellback_sdk import AsyncMobileClient, OutboxError
from tests.sdk.conftest import BASE, FAST, AsyncFaultTransport, Faults, InProcess, posts_to
from tests.sdk.test_uploads import png
from tests.server.conftest import identity_token


def mobile(
    server: InProcess,
    tmp_path: Path,
    faults: Faults,
    app_key: str | None = None,
    auto_flush: bool = True,
) -> AsyncMobileClient:
    return AsyncMobileClient(
        BASE,
        app_key or server.app.app_key,
        data_dir=tmp_path,
        transport=AsyncFaultTransport(server.asgi, faults),
        retry_policy=FAST,
        auto_flush=auto_flush,
    )


async def test_dead_letters_retry_and_discard(server: InProcess, tmp_path: Path) -> None:
    app = await server.api.create_app(
        "categories", categories=["bug"], rate_limits={"app_per_minute": 0, "user_per_minute": 0}
    )
    async with mobile(server, tmp_path, Faults(), app.app_key, auto_flush=False) as tb:
        bad = await tb.conversations.create("wrong category", category="nope")
        reply = await tb.messages.create(bad, "follow-up")
        good = await tb.conversations.create("right category", category="bug")
        result = await tb.outbox.flush()
        assert (result.sent, result.dead, result.pending) == (1, 2, 0)
        dead = {d.id: d for d in tb.outbox.dead_letters()}
        bad_error, reply_error = dead[bad.id].error, dead[reply.id].error
        assert bad_error is not None
        assert (bad_error.status, bad_error.code) == (422, "validation_failed")
        assert reply_error is not None
        assert "conversation could not be sent" in reply_error.message
        sent = tb.outbox.get(good.id)
        assert sent is not None
        assert sent.state == "sent"
        assert sent.remote_id
        # The operator adds the category; the user retries both.
        r = await server.api.http.patch(
            f"/v1/admin/apps/{app.id}",
            json={"settings": {"categories": ["bug", "nope"]}},
            headers=server.api.admin,
        )
        assert r.status_code == 200, r.text
        assert tb.outbox.retry(bad.id)
        assert tb.outbox.retry(reply.id)
        assert (await tb.outbox.flush()).sent == 2
        conv = tb.outbox.get(bad.id)
        assert conv is not None
        assert conv.remote_id is not None
        bodies = [m.body async for m in tb.messages.list(conv.remote_id)]
        assert bodies == ["wrong category", "follow-up"]
        orphan = await tb.conversations.create("x", category="unknown")
        await tb.outbox.flush()
        assert tb.outbox.discard(orphan.id)
        assert tb.outbox.get(orphan.id) is None


async def test_message_waits_for_its_queued_conversation_and_files_are_copied(
    server: InProcess, tmp_path: Path
) -> None:
    photo = tmp_path / "IMG_1.png"
    photo.write_bytes(png())
    offline = Faults(drop_before=1.0)
    async with mobile(server, tmp_path / "sdk", offline, auto_flush=False) as tb:
        conv = await tb.conversations.create("crash on start", attachments=[photo])
        msg = await tb.messages.create(conv, "it happens after the update", attachments=[photo])
        photo.unlink()  # the app may delete its temp file at once
        result = await tb.outbox.flush()
        assert (result.sent, result.pending) == (0, 2)
        assert result.stopped_by is not None
        offline.drop_before = 0.0
        assert (await tb.outbox.flush()).sent == 2
        sent_msg = tb.outbox.get(msg.id)
        assert sent_msg is not None
        assert sent_msg.conversation_id == tb.outbox.get(conv.id).remote_id  # type: ignore[union-attr]
        messages = [m async for m in tb.messages.list(sent_msg.conversation_id or "")]
        assert [m.body for m in messages] == ["crash on start", "it happens after the update"]
        assert [len(m.attachments) for m in messages] == [1, 1]
        assert not any((tmp_path / "sdk" / "outbox-files").iterdir())
        try:
            await tb.messages.create(conv, "now", queue=False)
        except OutboxError:
            raise AssertionError("the conversation is sent; its real id is known") from None


async def test_background_flush_backs_off_while_offline(server: InProcess, tmp_path: Path) -> None:
    faults = Faults(only=posts_to("/v1/client/conversations"), script=["drop_before"] * 12)
    async with mobile(server, tmp_path, faults) as tb:
        item = await tb.conversations.create("sent in the background")
        for _ in range(200):
            current = tb.outbox.get(item.id)
            if current is not None and current.state == "sent":
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the background flush never delivered the item")
        assert faults.counts["drop_before"] == 12
    assert tb.outbox._task is None  # stopped by close


async def test_429_and_503_stop_a_flush_but_keep_the_item(
    server: InProcess, tmp_path: Path
) -> None:
    """A Retry-After stops the flush at once (no sleeping in it) and is remembered (no
    flush sends before it has passed: test_outbox_safety); then the next one sends."""
    faults = Faults(only=posts_to("/v1/client/conversations"), script=["status:503"])
    async with mobile(server, tmp_path, faults, auto_flush=False) as tb:

        def once_the_pause_has_passed() -> None:
            assert tb._core.store.get("outbox_paused_until") is not None
            tb._core.store.set("outbox_paused_until", None)

        await tb.conversations.create("survives a 503 storm")
        result = await tb.outbox.flush()
        assert (result.pending, result.retry_after) == (1, 1.0)
        once_the_pause_has_passed()
        faults.script = ["status:429"]
        result = await tb.outbox.flush()
        assert (result.pending, result.retry_after) == (1, 1.0)
        assert faults.counts == {"status:503": 1, "status:429": 1}
        once_the_pause_has_passed()
        assert (await tb.outbox.flush()).sent == 1
        assert tb.outbox.dead_letters() == []


@pytest.mark.parametrize("lost", ["request", "answer"])
async def test_login_keeps_queued_items_as_they_are(
    server: InProcess, tmp_path: Path, lost: str
) -> None:
    """An anonymous create with a photo fails (the request, or only its answer, is lost);
    the user logs in before the next flush. The server's merge moves the upload and the
    key to the user, so the SDK resends the same bytes with the same key and uploads
    nothing again (it used to re-upload and rebuild the body: a 409 after a lost answer).
    """
    _, agent = await server.api.create_agent(server.app)
    photo = tmp_path / "IMG.png"
    photo.write_bytes(png())
    sent: list[tuple[str | None, bytes]] = []

    def creates(request: httpx.Request) -> bool:
        if not posts_to("/v1/client/conversations")(request):
            return False
        sent.append((request.headers.get("Idempotency-Key"), request.content))
        return True

    first = "drop_before" if lost == "request" else "drop_after"
    faults = Faults(only=creates, script=[first])
    async with mobile(server, tmp_path / "sdk", faults, auto_flush=False) as tb:
        item = await tb.conversations.create("the app froze", attachments=[photo])
        faults.drop_before = 1.0  # offline for the rest of this flush and identify's
        assert (await tb.outbox.flush()).pending == 1
        token = identity_token(server.app.identity_secret, "u-1", kid=server.app.identity_kid)
        assert (await tb.identify(token)).discarded == 0
        faults.drop_before = 0.0
        result = await tb.outbox.flush()
        assert faults.log.count("POST /v1/client/uploads") == 1
        assert len(set(sent)) == 1  # every attempt, before and after login: same key, bytes
        # (With the answer lost, the server replays it: the key comes before the check
        # that finds the attachments on the message the first attempt made.)
        assert (result.sent, result.dead) == (1, 0), tb.outbox.get(item.id)
    conversations = await server.conversations(agent)
    assert [c["last_message"]["body"] for c in conversations] == ["the app froze"]
