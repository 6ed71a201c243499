"""Uploads and devices under concurrency: the same request sent twice at once, to two
API processes on one PostgreSQL (on SQLite, twice to one process: its single writer
serialises them, and the answers must be the same).

Each test runs enough rounds of ``asyncio.gather`` to catch the race on the code that
had it (see the commit that added the test) and asserts the invariant an end user may
count on, whichever request wins.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from tellback_server.db.models import Attachment, Device, Job, Message
from tellback_server.plugins import build_registry
from tests.server.conftest import Api, make_settings, processes, serve_app

ROUNDS = 40
LOG = b"log line\n" * 100
UNLIMITED = {"app_per_minute": 0, "user_per_minute": 0}


@asynccontextmanager
async def two_apis(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[Api, Api]]:
    """Two API processes on PostgreSQL; one process, twice, on SQLite."""
    if database_url.startswith("postgresql"):
        async with processes(database_url, tmp_path, n=2, sessions_per_ip_per_minute=0) as apis:
            yield apis[0], apis[1]
        return
    settings = make_settings(database_url, tmp_path / "data", sessions_per_ip_per_minute=0)
    async with serve_app(settings, build_registry()) as api:
        yield api, api


def rounds(database_url: str) -> int:
    return ROUNDS if database_url.startswith("postgresql") else ROUNDS // 4


async def uploaded_log(api: Api, user: dict[str, str]) -> str:
    """A log file's upload with its bytes sent, not completed yet."""
    body = {"filename": "app.log", "content_type": "text/plain", "size": len(LOG), "kind": "log"}
    r = await api.http.post("/v1/client/uploads", json=body, headers=user)
    assert r.status_code == 201, r.text
    up = r.json()
    # A local-disk URL names the app itself, which the in-process client reaches.
    r = await api.http.put(up["single"]["url"], content=LOG, headers=up["single"]["headers"])
    assert r.status_code == 200, r.text
    return str(up["upload_id"])


async def completed_log(api: Api, user: dict[str, str]) -> str:
    upload_id = await uploaded_log(api, user)
    r = await api.http.post(f"/v1/client/uploads/{upload_id}/complete", json={}, headers=user)
    assert r.status_code == 200, r.text
    return upload_id


def codes(*answers: httpx.Response) -> tuple[int, ...]:
    return tuple(r.status_code for r in answers)


# ----- one upload, two messages ------------------------------------------------------------


async def message_holding(api: Api, app_id: str, upload_id: str) -> tuple[Any, list[Any]]:
    """The message the upload's row names, and the messages whose lists name it."""
    async with api.state.db.session(write=False) as db:
        holder = await db.scalar(
            select(Attachment.message_id).where(Attachment.id == uuid.UUID(upload_id))
        )
        rows = await db.execute(
            select(Message.id, Message.attachment_ids).where(Message.app_id == uuid.UUID(app_id))
        )
        return holder, [message_id for message_id, ids in rows if upload_id in ids]


async def test_an_upload_named_by_two_messages_at_once_joins_one(
    database_url: str, tmp_path: Path
) -> None:
    """Two follow-ups (or a new feedback and a follow-up) naming the same upload at once:
    one message gets it, the other request is refused as a second one sent after it
    would be (422, already attached), never both accepted."""
    async with two_apis(database_url, tmp_path) as (a, b):
        app = await a.create_app(rate_limits=UNLIMITED)
        user = await a.user_headers(app)
        convs = [(await a.feedback(user, body=f"conversation {i}"))["id"] for i in range(2)]
        outcomes: Counter[tuple[int, ...]] = Counter()
        wrong = []
        for n in range(rounds(database_url)):
            upload_id = await completed_log(a, user)
            message = {"body": "see the log", "attachment_ids": [upload_id]}
            follow_up = f"/v1/client/conversations/{convs[1]}/messages"
            second = "/v1/client/conversations" if n % 2 else follow_up
            answers = await asyncio.gather(
                a.http.post(
                    f"/v1/client/conversations/{convs[0]}/messages", json=message, headers=user
                ),
                b.http.post(second, json=message, headers=user),
            )
            outcomes[codes(*answers)] += 1
            holder, listing = await message_holding(a, app.id, upload_id)
            refused = [r for r in answers if r.status_code == 422]
            if (
                sorted(codes(*answers)) != [201, 422]
                or "already attached" not in refused[0].text
                or listing != [holder]
            ):
                wrong.append((n, codes(*answers), len(listing)))
        assert not wrong, (f"{len(wrong)} of {rounds(database_url)} rounds wrong", outcomes, wrong)


# ----- complete racing abort ---------------------------------------------------------------


async def test_complete_racing_abort_ends_in_one_answer(database_url: str, tmp_path: Path) -> None:
    """``complete`` and ``DELETE`` of one upload at once: either complete wins (200, and
    the abort after it aborts the completed upload: 204) or the abort wins (204, and the
    complete after it is told the upload was aborted: 404). The upload ends aborted
    either way, never ``processing`` with its bytes gone, and nothing answers 5xx."""
    async with two_apis(database_url, tmp_path) as (a, b):
        app = await a.create_app(rate_limits=UNLIMITED)
        user = await a.user_headers(app)
        outcomes: Counter[tuple[Any, ...]] = Counter()
        for _ in range(rounds(database_url)):
            upload_id = await uploaded_log(a, user)
            done, aborted = await asyncio.gather(
                a.http.post(f"/v1/client/uploads/{upload_id}/complete", json={}, headers=user),
                b.http.delete(f"/v1/client/uploads/{upload_id}", headers=user),
            )
            async with a.state.db.session(write=False) as db:
                status = await db.scalar(
                    select(Attachment.status).where(Attachment.id == uuid.UUID(upload_id))
                )
                jobs = await db.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.dedupe_key == f"media.process:{upload_id}")
                )
            code = done.json().get("code") if done.status_code >= 400 else None
            outcomes[(done.status_code, code, aborted.status_code, status, jobs)] += 1
        # (complete, its error code, abort, the upload's status, processing jobs queued)
        right = {(200, None, 204, "aborted", 1), (404, "not_found", 204, "aborted", 0)}
        assert set(outcomes) <= right, outcomes


# ----- one push token, two installations ---------------------------------------------------


async def register(api: Api, user: dict[str, str], token: str) -> httpx.Response:
    body = {"platform": "ios", "push_provider": "apns", "push_token": token}
    return await api.http.put("/v1/client/devices/current", json=body, headers=user)


async def holders(api: Api, *tokens: str) -> list[int]:
    """How many devices hold each token."""
    async with api.state.db.session(write=False) as db:
        rows = await db.scalars(
            select(Device.token).where(Device.provider == "apns", Device.token.in_(tokens))
        )
        held = Counter(rows)
    return [held[t] for t in tokens]


async def test_one_push_token_registered_by_two_installations_at_once(
    database_url: str, tmp_path: Path
) -> None:
    """The same token from two installations at once (a phone handed on, restored from a
    backup): both answered 200, and the token ends on exactly one device, not on two and
    not on none. Then the two swap tokens at once: both 200, each token on one device."""
    async with two_apis(database_url, tmp_path) as (a, b):
        app = await a.create_app(rate_limits=UNLIMITED)
        same: Counter[tuple[Any, ...]] = Counter()
        swap: Counter[tuple[Any, ...]] = Counter()
        for _ in range(rounds(database_url)):
            users = [await a.user_headers(app) for _ in range(2)]
            token = secrets.token_hex(32)
            answers = await asyncio.gather(
                register(a, users[0], token), register(b, users[1], token)
            )
            same[(*codes(*answers), *await holders(a, token))] += 1

            # Each holds a token of its own, then they exchange them at once.
            mine, theirs = secrets.token_hex(32), secrets.token_hex(32)
            for user, t in zip(users, (mine, theirs), strict=True):
                assert (await register(a, user, t)).status_code == 200
            answers = await asyncio.gather(
                register(a, users[0], theirs), register(b, users[1], mine)
            )
            swap[(*codes(*answers), *await holders(a, mine, theirs))] += 1
        # (the two answers, how many devices hold each token)
        assert set(same) == {(200, 200, 1)}, same
        assert set(swap) == {(200, 200, 1, 1)}, swap
