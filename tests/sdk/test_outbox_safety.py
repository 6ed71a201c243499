"""Outbox safety rules found by a review, each against a small in-memory server
(``httpx.MockTransport``): what a status, a file or a race must never do to queued
feedback. The login merge, which needs the real server, is in test_outbox_rules.py."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tellback_sdk import (
    AsyncMobileClient,
    AttachmentEmptyError,
    MobileClient,
    RetryPolicy,
    UserChangedError,
    _outbox_store,
)
from tellback_sdk._store import Store

CONVERSATIONS = "/v1/client/conversations"
QUICK = RetryPolicy(max_retries=4, base=0.0001, cap=0.0001, max_retry_after=0.0001)
LIMITS = {"max_bytes": 1_000_000, "content_types": ["text/plain", "image/png"]}

Answer = Callable[[httpx.Request], httpx.Response | None]


def problem(status: int, code: str = "x", **headers: str) -> httpx.Response:
    return httpx.Response(
        status,
        headers={"Content-Type": "application/problem+json", **headers},
        json={"type": "about:blank", "title": "t", "status": status, "code": code},
    )


class FakeServer:
    """Sessions, config, single-part uploads and creates; ``answer`` may intercept a
    create (return a response) or let it succeed (return None)."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer = answer
        self.created: list[str] = []
        self.posts = 0
        self.upload_sizes: list[int] = []
        self.upload_kinds: list[tuple[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/client/sessions":
            return httpx.Response(
                201,
                json={
                    "session_token": "tbs_x",
                    "expires_at": "2099-01-01T00:00:00Z",
                    "user": {"id": "u1", "attributes": {}},
                },
            )
        if path == "/v1/client/config":
            kinds = dict.fromkeys(("photo", "video", "file", "log"), LIMITS)
            return httpx.Response(200, json={"app": {"id": "a", "name": "x"}, "attachments": kinds})
        if path == "/v1/client/uploads":
            body = json.loads(request.content)
            self.upload_sizes.append(body["size"])
            self.upload_kinds.append((body["kind"], body["content_type"]))
            uid = str(uuid.uuid4())
            return httpx.Response(
                201,
                json={
                    "upload_id": uid,
                    "expires_at": "2099-01-01T00:00:00Z",
                    "method": "single",
                    "single": {"url": f"http://tb.test/put/{uid}", "headers": {}},
                },
            )
        if path.startswith("/put/"):
            request.read()
            return httpx.Response(200, headers={"ETag": '"e"'})
        if path.endswith("/complete"):
            return httpx.Response(
                200,
                json={
                    "id": path.split("/")[-2],
                    "kind": "file",
                    "filename": "f",
                    "content_type": "text/plain",
                    "size": 1,
                    "status": "processing",
                    "created_at": "2026-01-01T00:00:00Z",
                },
            )
        if path == CONVERSATIONS and request.method == "POST":
            self.posts += 1
            intercepted = self.answer(request) if self.answer else None
            if intercepted is not None:
                return intercepted
            self.created.append(json.loads(request.content)["body"])
            return httpx.Response(201, json={"id": str(uuid.uuid4())})
        if path.startswith(CONVERSATIONS) and path.endswith("/messages"):
            self.created.append(json.loads(request.content)["body"])
            return httpx.Response(201, json={"id": str(uuid.uuid4())})
        return problem(404, "not_found")


def client(tmp_path: Path, fake: FakeServer, policy: RetryPolicy = QUICK) -> MobileClient:
    return MobileClient(
        "http://tb.test",
        "tbk_x",
        data_dir=tmp_path / "sdk",
        transport=httpx.MockTransport(fake),
        retry_policy=policy,
    )


def async_client(
    tmp_path: Path, fake: FakeServer, policy: RetryPolicy = QUICK
) -> AsyncMobileClient:
    """The async twin of ``client``; flushes only when a test asks."""
    return AsyncMobileClient(
        "http://tb.test",
        "tbk_x",
        data_dir=tmp_path / "sdk",
        transport=httpx.MockTransport(fake),
        retry_policy=policy,
        auto_flush=False,
    )


def fails_for(body: str, response: Callable[[], httpx.Response]) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response | None:
        return response() if json.loads(request.content)["body"] == body else None

    return answer


# ----- the owner of queued items -----------------------------------------------------------


def test_two_threads_queueing_at_first_launch_share_one_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both threads read the owner at the same moment (a barrier makes the interleaving
    certain); both items must be flushed."""
    fake = FakeServer()
    tb = client(tmp_path, fake)
    barrier = threading.Barrier(2, timeout=5)
    first_read = threading.local()
    real_get = Store.get

    def get(self: Store, key: str) -> Any:
        value = real_get(self, key)
        if key == "owner" and not getattr(first_read, "done", False):
            first_read.done = True
            barrier.wait()
        return value

    monkeypatch.setattr(Store, "get", get)
    threads = [
        threading.Thread(target=tb.conversations.create, args=(f"feedback {n}",)) for n in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    with tb:
        assert len(tb.outbox.pending()) == 2
        assert tb.outbox.flush().sent == 2
    assert sorted(fake.created) == ["feedback 0", "feedback 1"]


def _jwt(sub: str) -> str:
    """An unsigned stand-in: the SDK only reads ``sub`` to tell users apart."""
    payload = base64.urlsafe_b64encode(json.dumps({"sub": sub}).encode()).decode().rstrip("=")
    return f"e30.{payload}.sig"


def test_identify_as_another_user_never_sends_the_first_users_items(tmp_path: Path) -> None:
    offline = {"on": False}

    def answer(request: httpx.Request) -> httpx.Response | None:
        if offline["on"]:
            raise httpx.ConnectError("offline", request=request)
        return None

    fake = FakeServer(answer)
    with client(tmp_path, fake) as tb:
        tb.identify(_jwt("alice"))
        offline["on"] = True
        tb.conversations.create("alice's feedback")
        result = tb.identify(_jwt("bob"))
        offline["on"] = False
        assert result.discarded == 1  # reported, not lost silently
        assert tb.outbox.pending() == []
        assert tb.outbox.flush().sent == 0
    assert fake.created == []


def test_an_item_queued_while_the_user_logs_out_is_refused_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queueing thread reads the owner, and another thread's logout purges that
    owner's items before the row is written (here, while the file is copied). The item
    stayed on disk, owned by no one: never sent, listed, nor counted by the logout. Now
    it is refused (the caller learns it was not queued) and its copy goes."""
    log = tmp_path / "crash.log"
    log.write_text("boot failed\n")
    fake = FakeServer()
    tb = client(tmp_path, fake)
    tb.identify(_jwt("alice"))
    real_copy = _outbox_store._durable_copy

    def copy_while_logging_out(src: Path, dest: Path) -> None:
        real_copy(src, dest)
        thread = threading.Thread(target=tb.logout, kwargs={"flush_timeout": 1})
        thread.start()
        thread.join()

    monkeypatch.setattr(_outbox_store, "_durable_copy", copy_while_logging_out)
    with tb:
        with pytest.raises(UserChangedError):
            tb.conversations.create("alice's report", attachments=[log])
        monkeypatch.undo()
        assert tb.outbox.pending() == []
        assert tb._core.store.query("SELECT id FROM outbox") == []
        assert not any(tb._core.store.files_dir.iterdir())
        tb.conversations.create("the next user's report")  # queueing goes on
        assert tb.outbox.flush().sent == 1
    assert fake.created == ["the next user's report"]


async def test_an_async_item_queued_while_the_user_logs_out_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "crash.log"
    log.write_text("boot failed\n")
    fake = FakeServer()
    async with async_client(tmp_path, fake) as tb:
        await tb.identify(_jwt("alice"))
        loop = asyncio.get_running_loop()
        real_copy = _outbox_store._durable_copy

        def copy_while_logging_out(src: Path, dest: Path) -> None:
            real_copy(src, dest)  # (in a thread: the loop is free to log out)
            asyncio.run_coroutine_threadsafe(tb.logout(flush_timeout=1), loop).result(10)

        monkeypatch.setattr(_outbox_store, "_durable_copy", copy_while_logging_out)
        with pytest.raises(UserChangedError):
            await tb.conversations.create("alice's report", attachments=[log])
        monkeypatch.undo()
        assert tb._core.store.query("SELECT id FROM outbox") == []
        assert not any(tb._core.store.files_dir.iterdir())
    assert fake.created == []


# ----- a server asking for a pause -----------------------------------------------------------

# The outbox's default: the full Retry-After (a test that slept it would hang for an hour).
FULL_RETRY_AFTER = RetryPolicy(max_retries=4, base=0.0001, cap=0.0001)


def _pause(request: httpx.Request) -> httpx.Response:
    return problem(503, "service_unavailable", **{"Retry-After": "3600"})


def test_retry_after_stops_the_flush_instead_of_sleeping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    naps: list[float] = []
    monkeypatch.setattr(time, "sleep", naps.append)
    fake = FakeServer(_pause)
    with client(tmp_path, fake, FULL_RETRY_AFTER) as tb:
        tb.conversations.create("kept for later")
        result = tb.outbox.flush()
        assert (result.sent, result.dead, result.pending) == (0, 0, 1)
        assert result.retry_after == 3600
        assert fake.posts == 1
    # The pause is kept in data_dir: neither another flush nor a restart ignores it.
    with client(tmp_path, fake, FULL_RETRY_AFTER) as tb:
        again = tb.outbox.flush()
        assert again.pending == 1
        assert again.retry_after is not None
        assert 3500 < again.retry_after <= 3600
        assert fake.posts == 1
        tb._core.store.set("outbox_paused_until", time.time() - 1)  # an hour later
        fake.answer = None
        assert tb.outbox.flush().sent == 1
    assert naps == []


def test_the_outbox_pause_is_capped_by_the_policy(tmp_path: Path) -> None:
    """``RetryPolicy.outbox_max_retry_after`` bounds the pause the outbox keeps (it had no
    effect: an hour's Retry-After held every flush, and a logout's, for the hour)."""
    capped = RetryPolicy(max_retries=4, base=0.0001, cap=0.0001, outbox_max_retry_after=5.0)
    fake = FakeServer(_pause)
    with client(tmp_path, fake, capped) as tb:
        tb.conversations.create("kept for later")
        assert tb.outbox.flush().retry_after == 3600  # (what the server asked)
        again = tb.outbox.flush()
        assert again.retry_after is not None
        assert 0 < again.retry_after <= 5
        assert fake.posts == 1


async def test_async_logout_is_not_held_by_a_retry_after(tmp_path: Path) -> None:
    fake = FakeServer(_pause)
    async with async_client(tmp_path, fake, FULL_RETRY_AFTER) as tb:
        await tb.conversations.create("kept for later")
        # Bounded so a regression fails here instead of sleeping an hour.
        result = await asyncio.wait_for(tb.outbox.flush(), 30)
        assert (result.pending, result.retry_after) == (1, 3600)
        # Logout does not hammer a server that asked for a pause; what is left is deleted
        # and reported.
        assert (await asyncio.wait_for(tb.logout(), 30)).discarded == 1
    assert fake.posts == 1


def test_logout_gives_up_sending_at_its_deadline(tmp_path: Path) -> None:
    """Unreachable without Retry-After: logout stops retrying at ``flush_timeout``
    instead of spending the whole backoff budget."""

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down", request=request)

    slow = RetryPolicy(max_retries=4, base=60.0, cap=60.0)  # any wait passes the deadline
    fake = FakeServer(down)
    with client(tmp_path, fake, slow) as tb:
        tb.config.get()  # signed in: logout tries to send first
        tb.conversations.create("kept for later")
        assert tb.logout(flush_timeout=1.0).discarded == 1
    assert fake.posts == 1


def test_logouts_requests_wait_no_longer_than_its_deadline(tmp_path: Path) -> None:
    """Each request a logout makes is given at most what is left of ``flush_timeout``
    (a request the network held ran its 30 s read timeout, however short the deadline);
    a flush of its own keeps the client's timeouts."""
    reads: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response | None:
        reads.append(request.extensions["timeout"]["read"])
        return None

    fake = FakeServer(answer)
    with client(tmp_path, fake) as tb:
        tb.conversations.create("sent by a flush")
        assert tb.outbox.flush().sent == 1
        tb.conversations.create("sent at logout")
        tb.logout(flush_timeout=1.0)
    assert reads[0] == 30.0
    assert 0 < reads[1] <= 1.0
    assert fake.created == ["sent by a flush", "sent at logout"]


# ----- which answers dead-letter an item ---------------------------------------------------


@pytest.mark.parametrize("status", [501, 505, 507, 520, 522, 524, 530, 599, 302, 407])
def test_odd_5xx_redirects_and_407_keep_the_queue(tmp_path: Path, status: int) -> None:
    """Not a 4xx refusing the item: a captive portal, a CDN, a proxy. Kept, in order."""
    down = {"on": True}

    def answer(request: httpx.Request) -> httpx.Response | None:
        if not down["on"]:
            return None
        if status == 302:
            return httpx.Response(302, headers={"Location": "http://portal.test/login"})
        return problem(status)

    fake = FakeServer(answer)
    with client(tmp_path, fake) as tb:
        for n in range(3):
            tb.conversations.create(f"feedback {n}")
        result = tb.outbox.flush()
        assert (result.sent, result.dead, result.pending) == (0, 0, 3)
        assert tb.outbox.dead_letters() == []
        down["on"] = False
        assert tb.outbox.flush().sent == 3
    assert fake.created == ["feedback 0", "feedback 1", "feedback 2"]


@pytest.mark.parametrize("status", [400, 403, 404, 409, 413, 415, 422])
def test_a_4xx_refusing_the_item_dead_letters_it_alone(tmp_path: Path, status: int) -> None:
    fake = FakeServer(fails_for("refused", lambda: problem(status)))
    with client(tmp_path, fake) as tb:
        refused = tb.conversations.create("refused")
        tb.conversations.create("fine")
        result = tb.outbox.flush()
        assert (result.sent, result.dead, result.pending) == (1, 1, 0)
        assert [d.id for d in tb.outbox.dead_letters()] == [refused.id]
    assert fake.created == ["fine"]


# ----- two clients on one data directory ---------------------------------------------------


def test_a_sent_item_is_never_turned_into_a_dead_letter(tmp_path: Path) -> None:
    """Client B is uploading the item's file when client A (same data directory) sends
    the item and deletes its copies; B's upload then fails for a missing file, which
    must not overwrite "sent" with "dead"."""
    log_file = tmp_path / "app.txt"
    log_file.write_text("trace")
    fake_a, fake_b = FakeServer(), FakeServer()
    a = client(tmp_path, fake_a)
    item = a.conversations.create("bug report", attachments=[log_file])

    def b_handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/client/uploads":
            assert a.outbox.flush().sent == 1  # A wins the race, here, every time
        return fake_b(request)

    b = MobileClient(
        "http://tb.test",
        "tbk_x",
        data_dir=tmp_path / "sdk",
        transport=httpx.MockTransport(b_handler),
        retry_policy=QUICK,
    )
    with a, b:
        result = b.outbox.flush()
        assert (result.sent, result.dead) == (0, 0)
        sent = a.outbox.get(item.id)
        assert sent is not None
        assert (sent.state, sent.error) == ("sent", None)
        assert b.outbox.dead_letters() == []
    assert fake_a.created == ["bug report"]
    assert fake_b.created == []


# ----- files -----------------------------------------------------------------------------------


def test_a_log_file_goes_as_a_text_log(tmp_path: Path) -> None:
    log_file = tmp_path / "app.log"
    log_file.write_text("12:00 crash\n")
    fake = FakeServer()
    with client(tmp_path, fake) as tb:
        tb.conversations.create("it crashed", attachments=[log_file])
        assert tb.outbox.flush().sent == 1
    assert fake.upload_kinds == [("log", "text/plain")]


def test_an_empty_file_is_refused_when_queued(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.touch()
    fake = FakeServer()
    with client(tmp_path, fake) as tb:
        with pytest.raises(AttachmentEmptyError, match=r"empty\.log is empty"):
            tb.conversations.create("with nothing attached", attachments=[empty])
        assert tb.outbox.pending() == []
        with pytest.raises(AttachmentEmptyError):
            tb.attachments.upload(b"", filename="blank.txt")
    assert (fake.posts, fake.upload_sizes) == (0, [])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_file_copies_reach_the_disk_before_the_item_is_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy and the directory entries naming it are fsynced while no row names
    them yet: a power cut after the commit finds every file the row lists."""
    photo = tmp_path / "shot.png"
    photo.write_bytes(b"\x89PNG....")
    with client(tmp_path, FakeServer()) as tb:
        synced: list[tuple[str, int]] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            rows = tb._core.store.query("SELECT count(*) AS n FROM outbox")[0]["n"]
            synced.append((os.readlink(f"/proc/self/fd/{fd}"), rows))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        item = tb.conversations.create("look", attachments=[photo])
        monkeypatch.undo()
        files = tb._core.store.files_dir
        (copy,) = (files / item.id).iterdir()
        for path in (copy, files / item.id, files, tb._core.store.data_dir):
            assert (str(path), 0) in synced, (path, synced)


# ----- an item that can never go -----------------------------------------------------------


def test_an_item_the_server_always_fails_on_is_given_up_and_the_queue_moves(
    tmp_path: Path,
) -> None:
    crash = fails_for("poison", lambda: problem(500, "internal_error"))
    fake = FakeServer(crash)
    quick_give_up = dataclasses.replace(
        QUICK, outbox_give_up_failures=3, outbox_give_up_seconds=0.0
    )
    with client(tmp_path, fake, quick_give_up) as tb:
        poison = tb.conversations.create("poison")
        reply = tb.messages.create(poison, "more about it")
        tb.conversations.create("innocent")
        results = [tb.outbox.flush() for _ in range(3)]
        assert [(r.sent, r.dead, r.pending) for r in results] == [
            (0, 0, 3),
            (0, 0, 3),
            (1, 2, 0),  # the poison and its reply (kept in order), then the rest
        ]
        dead = {d.id: d.error.message for d in tb.outbox.dead_letters() if d.error}
        assert set(dead) == {poison.id, reply.id}
        assert "given up" in dead[poison.id]
        # Visible and retryable: the server is fixed, the user taps Retry.
        fake.answer = None
        assert tb.outbox.retry(poison.id)
        assert tb.outbox.retry(reply.id)
        assert tb.outbox.flush().sent == 2
    assert fake.created == ["innocent", "poison", "more about it"]


def test_an_outage_is_not_mistaken_for_a_poison_item(tmp_path: Path) -> None:
    """Below the age bound, or with answers of an outage (503, Retry-After, no problem
    code from a proxy), the item waits however many times it fails."""
    answers = iter(
        [problem(500, "internal_error")] * 5
        + [problem(503, "service_unavailable")] * 5
        + [problem(500, "internal_error", **{"Retry-After": "0"})] * 5
        + [httpx.Response(502, text="Bad Gateway")] * 5
    )
    fake = FakeServer(lambda _request: next(answers, None))
    policy = dataclasses.replace(QUICK, outbox_give_up_failures=3)
    with client(tmp_path, fake, policy) as tb:
        tb.conversations.create("waits")
        while fake.posts < 20:
            assert tb.outbox.flush().pending == 1
        assert tb.outbox.flush().sent == 1
        assert tb.outbox.dead_letters() == []


@pytest.mark.parametrize("damage", ["directory", "gone", "symlink loop"])
def test_an_unreadable_file_copy_dead_letters_its_item_alone(tmp_path: Path, damage: str) -> None:
    log_file = tmp_path / "a.txt"
    log_file.write_text("log")
    fake = FakeServer()
    with client(tmp_path, fake) as tb:
        broken = tb.conversations.create("with a log", attachments=[log_file])
        tb.conversations.create("innocent")
        (copy,) = (tb._core.store.files_dir / broken.id).iterdir()
        copy.unlink()
        if damage == "directory":  # EISDIR: unreadable, like EACCES or EIO
            copy.mkdir()
        if damage == "symlink loop":  # ELOOP
            copy.symlink_to(copy)
        result = tb.outbox.flush()
        assert (result.sent, result.dead, result.pending) == (1, 1, 0)
        (dead,) = tb.outbox.dead_letters()
        assert dead.id == broken.id
        assert dead.error is not None
        assert dead.error.code == "local"
    assert fake.created == ["innocent"]


def test_a_data_directory_from_before_the_failure_count_is_upgraded(tmp_path: Path) -> None:
    fake = FakeServer()
    with client(tmp_path, fake) as tb:
        tb.conversations.create("queued by the previous version")
        db = sqlite3.connect(tmp_path / "sdk" / "tellback-sdk.db")
        db.execute("ALTER TABLE outbox DROP COLUMN server_failures")
        db.execute("ALTER TABLE outbox DROP COLUMN failing_since")
        db.commit()
        db.close()
    with client(tmp_path, fake) as tb:
        assert tb.outbox.flush().sent == 1
    assert fake.created == ["queued by the previous version"]


@pytest.mark.parametrize(
    ("column", "value"),
    [("attachments", "[{"), ("request", "{"), ("attachments", '[{"no": "path"}]')],
)
def test_an_unreadable_row_is_a_dead_letter_not_a_block(
    tmp_path: Path, column: str, value: str
) -> None:
    fake = FakeServer()
    with client(tmp_path, fake) as tb:
        bad = tb.conversations.create("first")
        tb.conversations.create("second")
        damage = {
            "attachments": "UPDATE outbox SET attachments = ? WHERE id = ?",
            "request": "UPDATE outbox SET request = ? WHERE id = ?",
        }
        tb._core.store.query(damage[column], (value, bad.id))
        assert len(tb.outbox.pending()) == 2  # listing never raises
        result = tb.outbox.flush()
        assert (result.sent, result.dead, result.pending) == (1, 1, 0)
        (dead,) = tb.outbox.dead_letters()
        assert dead.id == bad.id
        assert dead.error is not None
        assert "cannot read" in dead.error.message
    assert fake.created == ["second"]


@pytest.mark.parametrize("stored", ["relative", "absolute (an older version)"])
def test_a_moved_data_directory_keeps_its_queued_files(tmp_path: Path, stored: str) -> None:
    log_file = tmp_path / "a.txt"
    log_file.write_text("log")
    fake = FakeServer()
    with client(tmp_path, fake) as tb:
        item = tb.conversations.create("with a log", attachments=[log_file])
        if stored != "relative":
            files = tb._core.store.files_dir
            (copy,) = (files / item.id).iterdir()
            atts = json.dumps(
                [
                    {
                        "path": str(copy),
                        "kind": None,
                        "content_type": None,
                        "filename": "a.txt",
                        "attachment_id": None,
                    }
                ]
            )
            tb._core.store.query("UPDATE outbox SET attachments = ?", (atts,))
    (tmp_path / "sdk").rename(tmp_path / "moved")  # e.g. restored from a backup elsewhere
    moved = MobileClient(
        "http://tb.test",
        "tbk_x",
        data_dir=tmp_path / "moved",
        transport=httpx.MockTransport(fake),
        retry_policy=QUICK,
    )
    with moved:
        assert moved.outbox.flush().sent == 1
    assert (fake.created, fake.upload_sizes) == (["with a log"], [3])


def test_a_follow_up_to_a_conversation_sent_long_ago_finds_it(tmp_path: Path) -> None:
    """The app kept the QueuedItem it got before the conversation was sent; a week
    later the conversation's row is pruned to its ids, never deleted."""
    fake = FakeServer()
    with client(tmp_path, fake) as tb:
        conv = tb.conversations.create("first report")
        tb.outbox.flush()
        eight_days_ago = time.time() - 8 * 86400
        tb._core.store.query("UPDATE outbox SET updated_at = ?", (eight_days_ago,))
        tb.conversations.create("another report")
        tb.outbox.flush()  # each send prunes what is older than a week
        old = tb.outbox.get(conv.id)
        assert old is not None
        assert (old.state, old.body) == ("sent", None)  # its text is not kept
        follow_up = tb.messages.create(conv, "follow-up")
        assert tb.outbox.flush().sent == 1
        sent = tb.outbox.get(follow_up.id)
        assert sent is not None
        assert sent.conversation_id == old.remote_id
    assert fake.created == ["first report", "another report", "follow-up"]


async def test_a_cancelled_create_queues_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its file is being copied (in a thread a cancel cannot stop):
    nothing is queued and the copy goes, so an app that queues again sends it once."""
    big = tmp_path / "log.txt"
    big.write_text("x" * 1000)
    copying, release = threading.Event(), threading.Event()
    real_copy = _outbox_store._durable_copy

    def slow_copy(src: Path, dest: Path) -> None:
        copying.set()
        release.wait(10)
        real_copy(src, dest)

    monkeypatch.setattr(_outbox_store, "_durable_copy", slow_copy)
    fake = FakeServer()
    async with async_client(tmp_path, fake) as tb:
        task = asyncio.create_task(tb.conversations.create("app crashed", attachments=[big]))
        await asyncio.to_thread(copying.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        files = tb._core.store.files_dir
        for _ in range(500):  # the copying thread ends, then its copy is removed
            if not any(files.iterdir()):
                break
            await asyncio.sleep(0.01)
        assert not any(files.iterdir())
        assert tb.outbox.pending() == []
        await tb.conversations.create("app crashed", attachments=[big])  # queued again
        assert (await tb.outbox.flush()).sent == 1
    assert fake.created == ["app crashed"]
