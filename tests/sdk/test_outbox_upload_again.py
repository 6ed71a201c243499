"""An item whose upload the server expired before its message was sent: a phone that
went offline between the upload and the message for longer than the server keeps an
upload no message took (7 days). The outbox uploads its kept copy again, once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tellback_server.domain.attachments import media
from tests.sdk.conftest import Faults, InProcess, posts_to
from tests.sdk.test_outbox_rules import mobile
from tests.sdk.test_uploads import png


async def test_an_upload_expired_while_offline_is_sent_again(
    server: InProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = tmp_path / "IMG_2.png"
    photo.write_bytes(png())
    # The upload goes through; every try of the message then finds no network.
    offline = Faults(only=posts_to("/v1/client/conversations"), script=["drop_before"] * 5)
    async with mobile(server, tmp_path / "sdk", offline, auto_flush=False) as tb:
        item = await tb.conversations.create("the photo shows it", attachments=[photo])
        result = await tb.outbox.flush()
        assert (result.sent, result.pending) == (0, 1)
        [first] = tb.outbox._store.attachments(tb.outbox._store._row(item.id))  # type: ignore[arg-type]
        assert first["attachment_id"] is not None
        # A week later the server has expired the upload no message took.
        monkeypatch.setattr(media, "UNATTACHED_TTL", dt.timedelta(0))
        assert await media.expire_abandoned_uploads(server.api.state) == 1
        result = await tb.outbox.flush()
        assert (result.sent, result.dead) == (1, 0), result
        sent = tb.outbox.get(item.id)
        assert sent is not None
        assert sent.remote_id is not None
        messages = [m async for m in tb.messages.list(sent.remote_id)]
        [attachment] = messages[0].attachments
        assert attachment.id != first["attachment_id"]
        assert attachment.status in ("processing", "ready")
