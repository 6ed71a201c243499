"""Uploads: local limit checks, single and multipart, resume after a kill, restart
after the server forgot the upload. Checked against what the server stored."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tellback_sdk import (
    AsyncClient,
    AttachmentTooLargeError,
    AttachmentTypeNotAllowedError,
    Client,
)
from tests.sdk.conftest import (
    BASE,
    FAST,
    AsyncFaultTransport,
    Faults,
    InProcess,
    Killed,
    Live,
    SyncFaultTransport,
)

MIB = 1024 * 1024


def png(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def big_zip(path: Path, size: int = 17 * MIB + 4321) -> str:
    data = b"PK\x03\x04" + os.urandom(size - 4)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def is_part_put(n: int) -> Callable[[httpx.Request], bool]:
    return lambda r: r.method == "PUT" and r.url.params.get("part") == str(n)


async def test_single_upload_with_progress_and_attach(server: InProcess, tmp_path: Path) -> None:
    photo = tmp_path / "shot.png"
    photo.write_bytes(png())
    seen: list[tuple[int, int]] = []
    async with AsyncClient(
        BASE, server.app.app_key, data_dir=tmp_path / "sdk", transport=server.asgi
    ) as tb:
        att = await tb.attachments.upload(photo, on_progress=lambda s, t: seen.append((s, t)))
        assert (att.kind, att.content_type, att.size) == ("photo", "image/png", len(png()))
        assert att.status == "processing"
        conv = await tb.conversations.create("see photo", attachment_ids=[att.id])
        assert conv.last_message is not None
        assert [a.id for a in conv.last_message.attachments] == [att.id]
        msg = await tb.messages.create(conv.id, "and another", attachments=[photo])
        assert len(msg.attachments) == 1
    assert seen[-1] == (len(png()), len(png()))


async def test_limits_are_checked_before_anything_is_sent(
    server: InProcess, tmp_path: Path
) -> None:
    app = await server.api.create_app(
        "tight",
        rate_limits={"app_per_minute": 0, "user_per_minute": 0},
        attachments={"photo": {"max_bytes": 100, "content_types": ["image/png"]}},
    )
    faults = Faults()
    async with AsyncClient(
        BASE, app.app_key, data_dir=tmp_path, transport=AsyncFaultTransport(server.asgi, faults)
    ) as tb:
        with pytest.raises(AttachmentTooLargeError) as too_big:
            await tb.attachments.upload(png(), filename="a.png")
        assert too_big.value.max_bytes == 100
        with pytest.raises(AttachmentTypeNotAllowedError):
            await tb.attachments.upload(b"\xff\xd8\xff" + b"0" * 50, filename="a.jpg")
    assert "POST /v1/client/uploads" not in faults.log
    assert faults.log == ["POST /v1/client/sessions", "GET /v1/client/config"]


def test_sync_multipart_resumes_after_a_kill(live: Live, tmp_path: Path) -> None:
    app = live.create_app()
    source = tmp_path / "logs.zip"
    digest = big_zip(source)
    faults = Faults(only=is_part_put(2), script=["kill_after"])  # dies once part 2 is stored

    def new_client() -> Client:
        return Client(
            live.url,
            app["app_key"],
            data_dir=tmp_path / "sdk",
            transport=SyncFaultTransport(httpx.HTTPTransport(), faults),
            retry_policy=FAST,
        )

    tb = new_client()
    with pytest.raises(Killed):
        tb.attachments.upload(source)
    tb._core.store.close()
    assert faults.stored_parts == [1, 2]
    with new_client() as tb:
        att = tb.attachments.upload(source)
        assert att.size == source.stat().st_size
        download = httpx.get(tb.attachments.get(att.id).url or "")
    assert faults.stored_parts == [1, 2, 3]  # each part sent exactly once
    assert faults.log.count("POST /v1/client/uploads") == 1
    assert hashlib.sha256(download.content).hexdigest() == digest


async def test_async_multipart_resume_sends_only_missing_parts(
    server: InProcess, tmp_path: Path
) -> None:
    source = tmp_path / "logs.zip"
    big_zip(source)
    faults = Faults(only=is_part_put(2), script=["kill_before"])

    def new_client() -> AsyncClient:
        return AsyncClient(
            BASE,
            server.app.app_key,
            data_dir=tmp_path / "sdk",
            transport=AsyncFaultTransport(server.asgi, faults),
            retry_policy=FAST,
        )

    tb = new_client()
    with pytest.raises(Killed):
        await tb.attachments.upload(source)
    tb._core.store.close()
    first = list(faults.stored_parts)
    assert 2 not in first
    async with new_client() as tb:
        att = await tb.attachments.upload(source)
        assert att.status == "processing"
    resent = faults.stored_parts[len(first) :]
    assert sorted(first + resent) == [1, 2, 3]  # no part stored twice, none missing


async def test_an_aborted_upload_restarts_cleanly(server: InProcess, tmp_path: Path) -> None:
    source = tmp_path / "logs.zip"
    big_zip(source)
    faults = Faults(only=is_part_put(1), script=["kill_before"])

    def new_client() -> AsyncClient:
        return AsyncClient(
            BASE,
            server.app.app_key,
            data_dir=tmp_path / "sdk",
            transport=AsyncFaultTransport(server.asgi, faults),
            retry_policy=FAST,
        )

    tb = new_client()
    with pytest.raises(Killed):
        await tb.attachments.upload(source)
    [row] = tb._core.store.query("SELECT upload_id FROM uploads")
    await tb.attachments.abort(row["upload_id"])  # as if it had expired on the server
    tb._core.store.close()
    async with new_client() as tb:
        att = await tb.attachments.upload(source)
        assert att.id != row["upload_id"]
        assert att.size == source.stat().st_size
        assert tb._core.store.query("SELECT * FROM uploads") == []
    assert faults.log.count("POST /v1/client/uploads") == 2
