"""The basic loop through both clients against the real server."""

from __future__ import annotations

from pathlib import Path

from tellback_sdk import AsyncClient, Client, Location
from tests.sdk.conftest import BASE, FAST, InProcess, Live


async def test_async_feedback_loop(server: InProcess, tmp_path: Path) -> None:
    async with AsyncClient(
        BASE,
        server.app.app_key,
        data_dir=tmp_path / "sdk",
        transport=server.asgi,
        retry_policy=FAST,
    ) as tb:
        conv = await tb.conversations.create(
            "The checkout button does nothing",
            location=Location(latitude=52.5, longitude=13.4),
            tags=["checkout"],
        )
        assert conv.last_message is not None
        msg = await tb.messages.create(conv.id, "Still broken")
        assert msg.conversation_id == conv.id
        ids = [c.id async for c in tb.conversations.list()]
        assert ids == [conv.id]
        bodies = [m.body async for m in tb.messages.list(conv.id)]
        assert bodies == ["The checkout button does nothing", "Still broken"]
        assert await tb.me.unread_count() == 0


def test_sync_feedback_loop(live: Live, tmp_path: Path) -> None:
    app = live.create_app()
    with Client(live.url, app["app_key"], data_dir=tmp_path / "sdk", retry_policy=FAST) as tb:
        conv = tb.conversations.create("Sync feedback")
        assert [c.id for c in tb.conversations.list()] == [conv.id]
        assert tb.config.get().app.id == app["id"]
