"""The outbox under a hostile network: nothing lost, nothing duplicated, order kept.

Requests are dropped before the server sees them, after it committed (the answer is
lost), and the process is "killed" mid-flush; a fresh client on the same data_dir
carries on. The proof is the server's own list of conversations.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tellback_sdk import AsyncMobileClient, MobileClient
from tests.sdk.conftest import (
    BASE,
    FAST,
    AsyncFaultTransport,
    Faults,
    InProcess,
    Killed,
    Live,
    SyncFaultTransport,
    posts_to,
)

N = 500


def hostile(seed: int) -> Faults:
    return Faults(
        rng=random.Random(seed),
        drop_before=0.12,
        drop_after=0.12,
        kill_after=0.01,
        only=posts_to("/v1/client/conversations"),
    )


def check_exactly_once(conversations: list[dict[str, Any]]) -> None:
    bodies = Counter(c["last_message"]["body"] for c in conversations)
    assert len(conversations) == N
    assert set(bodies) == {f"feedback #{i}" for i in range(N)}
    assert max(bodies.values()) == 1
    by_creation = sorted(conversations, key=lambda c: (c["created_at"], c["id"]))
    assert [c["last_message"]["body"] for c in by_creation] == [f"feedback #{i}" for i in range(N)]


async def test_async_outbox_exactly_once_in_order(server: InProcess, tmp_path: Path) -> None:
    _, agent = await server.api.create_agent(server.app)
    faults = hostile(1)

    def new_client() -> AsyncMobileClient:
        return AsyncMobileClient(
            BASE,
            server.app.app_key,
            data_dir=tmp_path,
            transport=AsyncFaultTransport(server.asgi, faults),
            retry_policy=FAST,
            auto_flush=False,
        )

    tb = new_client()
    for i in range(N):
        await tb.conversations.create(f"feedback #{i}")
    assert len(tb.outbox.pending()) == N
    restarts = 0
    while True:
        try:
            result = await tb.outbox.flush()
        except Killed:
            restarts += 1
            tb._core.store.close()  # the process is gone; only data_dir remains
            tb = new_client()
            continue
        if result.pending == 0:
            break
    await tb.close()
    assert restarts > 0
    assert faults.counts["drop_after"] > 0
    assert faults.counts["drop_before"] > 0
    check_exactly_once(await server.conversations(agent))


def test_sync_outbox_exactly_once_in_order(live: Live, tmp_path: Path) -> None:
    app = live.create_app()
    agent = live.create_agent(app["id"])
    faults = hostile(2)

    def new_client() -> MobileClient:
        return MobileClient(
            live.url,
            app["app_key"],
            data_dir=tmp_path,
            transport=SyncFaultTransport(httpx.HTTPTransport(), faults),
            retry_policy=FAST,
        )

    tb = new_client()
    for i in range(N):
        tb.conversations.create(f"feedback #{i}")
    restarts = 0
    while True:
        try:
            result = tb.outbox.flush()
        except Killed:
            restarts += 1
            tb._core.store.close()
            tb = new_client()
            continue
        if result.pending == 0:
            break
    tb.close()
    assert restarts > 0
    assert faults.counts["drop_after"] > 0
    check_exactly_once(live.conversations(app["id"], agent))
