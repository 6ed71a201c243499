"""The upload flow end to end, on local disk and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from tellback_server.db.models import Event
from tellback_server.jobs.worker import Worker
from tellback_server.plugins import build_registry
from tests.server.conftest import Api, identity_token


async def put(
    api: Api, url: str, data: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    """PUT to a presigned URL: the app itself (local disk) or the S3 server over the network."""
    if url.startswith(str(api.http.base_url).rstrip("/")):
        return await api.http.put(url, content=data, headers=headers)
    async with httpx.AsyncClient() as raw:
        return await raw.put(url, content=data, headers=headers)


async def get(api: Api, url: str) -> httpx.Response:
    if url.startswith(str(api.http.base_url).rstrip("/")):
        return await api.http.get(url)
    async with httpx.AsyncClient() as raw:
        return await raw.get(url)


def jpeg_with_gps(width: int = 1200, height: int = 800) -> bytes:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0110] = "TestPhone"  # Model
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (48.0, 8.0, 0.0)
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


async def run_jobs(api: Api) -> int:
    return await Worker(api.state, build_registry()).run_until_idle()


def photo_jobs(api: Api) -> int:
    """The jobs a photo with a location, completed, makes run at once: processing, then
    deleting the upload as sent. On S3 there are two uploads as sent: the copy made at
    `complete`, which processing read, and the key the URL wrote to (deleted once more
    when the URL has expired; that job is not due yet)."""
    return 2 if api.state.store.revokes_upload_urls else 3


async def start_upload(api: Api, user: dict[str, str], **body: Any) -> dict[str, Any]:
    r = await api.http.post("/v1/client/uploads", json=body, headers=user)
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()
    return data


async def test_photo_single_upload_processed_and_gps_stripped(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    photo = jpeg_with_gps()
    up = await start_upload(
        api,
        user,
        filename="../../etc/IMG_0001.JPG",
        content_type="image/jpeg",
        size=len(photo),
        kind="photo",
    )
    assert up["method"] == "single"
    r = await put(api, up["single"]["url"], photo, up["single"]["headers"])
    assert r.status_code == 200, r.text
    r = await api.http.post(f"/v1/client/uploads/{up['upload_id']}/complete", json={}, headers=user)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "processing"
    assert r.json()["filename"] == "IMG_0001.JPG"
    assert await run_jobs(api) == photo_jobs(api)
    r = await api.http.get(f"/v1/client/attachments/{up['upload_id']}", headers=user)
    att = r.json()
    assert att["status"] == "ready", att
    assert (att["width"], att["height"]) == (1200, 800)
    assert att["thumbnail_url"]
    original = await get(api, att["url"])
    assert original.status_code == 200
    stored = Image.open(io.BytesIO(original.content))
    assert 0x8825 not in stored.getexif()
    assert stored.getexif().get(0x0110) == "TestPhone"
    thumb = Image.open(io.BytesIO((await get(api, att["thumbnail_url"])).content))
    assert max(thumb.size) == 512

    # attach it to feedback; the message carries it
    conv = await api.feedback(user, attachment_ids=[up["upload_id"]])
    assert [a["id"] for a in conv["last_message"]["attachments"]] == [up["upload_id"]]

    def unsigned(attachments: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Without the signed URLs and their expiry, which every answer makes anew."""
        signed = ("url", "thumbnail_url", "expires_at")
        return [{k: v for k, v in a.items() if k not in signed} for a in attachments]

    # ... and so do the user's list and the conversation's message page
    created = unsigned(conv["last_message"]["attachments"])
    r = await api.http.get("/v1/client/conversations", headers=user)
    assert unsigned(r.json()["items"][0]["last_message"]["attachments"]) == created
    r = await api.http.get(f"/v1/client/conversations/{conv['id']}/messages", headers=user)
    assert unsigned(r.json()["items"][0]["attachments"]) == created
    # ... and it cannot be attached twice
    r = await api.http.post(
        "/v1/client/conversations",
        json={"body": "again", "attachment_ids": [up["upload_id"]]},
        headers=user,
    )
    assert r.status_code == 422


def attachment_views(found: Any) -> list[dict[str, Any]]:
    """Every attachment view (a dict with ``thumbnail_url``) anywhere inside ``found``."""
    if isinstance(found, dict):
        inner = [v for k, v in found.items() if k != "thumbnail_url"]
        return ([found] if "thumbnail_url" in found else []) + attachment_views(inner)
    if isinstance(found, list | tuple):
        return [view for item in found for view in attachment_views(item)]
    return []


async def uploaded(api: Api, user: dict[str, str], data: bytes, kind: str, ctype: str) -> str:
    """A single upload of ``data``, completed: its id (the attachment, processing)."""
    up = await start_upload(api, user, filename="f", content_type=ctype, size=len(data), kind=kind)
    assert (await put(api, up["single"]["url"], data, up["single"]["headers"])).status_code == 200
    r = await api.http.post(f"/v1/client/uploads/{up['upload_id']}/complete", json={}, headers=user)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "processing"
    return str(up["upload_id"])


async def test_a_photo_has_no_url_until_processing_removed_its_location(storage_api: Api) -> None:
    """While a photo is processing its stored bytes still hold the GPS position, so no
    one gets a URL to them: not the uploader, not the agents, not the events webhooks
    and streams carry (a receiver that fetches images would win the race against the
    job). A file or a log, which processing never rewrites, has one at once."""
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    _, agent = await api.create_agent(app)
    photo = await uploaded(api, user, jpeg_with_gps(), "photo", "image/jpeg")
    log = await uploaded(api, user, b"boot ok\n", "log", "text/plain")
    conv = await api.feedback(user, attachment_ids=[photo, log])
    urls = {a["id"]: a["url"] for a in conv["last_message"]["attachments"]}
    assert urls[photo] is None
    assert (await get(api, urls[log] or "")).content == b"boot ok\n"
    r = await api.http.get(f"/v1/agent/conversations/{conv['id']}/messages", headers=agent)
    shown = {a["id"]: a for a in r.json()["items"][0]["attachments"]}
    assert (shown[photo]["url"], shown[photo]["thumbnail_url"]) == (None, None)
    async with api.state.db.session(write=False) as db:
        payloads = [tuple(r) for r in await db.execute(select(Event.data, Event.client_data))]
    carried = {(a["id"], a["url"] is None) for a in attachment_views(payloads)}
    assert carried == {(photo, True), (log, False)}
    r = await api.http.get(f"/v1/client/attachments/{photo}", headers=user)
    assert r.json()["url"] is None
    await run_jobs(api)
    r = await api.http.get(f"/v1/agent/attachments/{photo}", headers=agent)
    assert r.json()["status"] == "ready", r.text
    stored = Image.open(io.BytesIO((await get(api, r.json()["url"])).content))
    assert 0x8825 not in stored.getexif()


async def test_multipart_resume_lists_parts_and_completes(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    size = 17 * 1024 * 1024 + 123
    blob = b"PK\x03\x04" + os.urandom(size - 4)
    up = await start_upload(
        api, user, filename="logs.zip", content_type="application/zip", size=size, kind="file"
    )
    assert up["method"] == "multipart"
    mp = up["multipart"]
    assert mp["part_size"] == 8 * 1024 * 1024
    assert [p["part_number"] for p in mp["parts"]] == [1, 2, 3]
    part_size = mp["part_size"]
    chunks = {n: blob[(n - 1) * part_size : n * part_size] for n in (1, 2, 3)}
    etags = {}
    for part in mp["parts"]:
        if part["part_number"] == 2:
            continue  # "the network dropped"
        r = await put(api, part["url"], chunks[part["part_number"]])
        assert r.status_code == 200, r.text
        etags[part["part_number"]] = r.headers["etag"].strip('"')
    # completing now is refused: a part is missing
    r = await api.http.post(f"/v1/client/uploads/{up['upload_id']}/complete", json={}, headers=user)
    assert r.status_code == 409
    assert r.json()["code"] == "upload_incomplete"
    # resume: the server says which parts it has and hands out a URL for the rest
    r = await api.http.get(f"/v1/client/uploads/{up['upload_id']}", headers=user)
    status = r.json()
    assert sorted(p["part_number"] for p in status["uploaded_parts"]) == [1, 3]
    assert {p["part_number"]: p["etag"] for p in status["uploaded_parts"]} == etags
    assert [p["part_number"] for p in status["multipart"]["parts"]] == [2]
    r = await put(api, status["multipart"]["parts"][0]["url"], chunks[2])
    assert r.status_code == 200
    etags[2] = r.headers["etag"].strip('"')
    parts = [{"part_number": n, "etag": etags[n]} for n in (1, 2, 3)]
    r = await api.http.post(
        f"/v1/client/uploads/{up['upload_id']}/complete", json={"parts": parts}, headers=user
    )
    assert r.status_code == 200, r.text
    await run_jobs(api)
    att = (await api.http.get(f"/v1/client/attachments/{up['upload_id']}", headers=user)).json()
    assert att["status"] == "ready"
    assert att["size"] == size
    assert (await get(api, att["url"])).content == blob


async def _every_part_sent(
    api: Api,
) -> tuple[dict[str, str], dict[str, Any], bytes, list[tuple[int, str]]]:
    """An end user, their multipart upload (17 MiB, over the single-PUT limit) with
    every part sent, its bytes, and each part's number and ETag."""
    user = await api.user_headers(await api.create_app())
    size = 17 * 1024 * 1024 + 7
    blob = b"PK\x03\x04" + os.urandom(size - 4)
    up = await start_upload(
        api, user, filename="logs.zip", content_type="application/zip", size=size, kind="file"
    )
    part_size = up["multipart"]["part_size"]
    parts = []
    for part in up["multipart"]["parts"]:
        n = part["part_number"]
        r = await put(api, part["url"], blob[(n - 1) * part_size : n * part_size])
        assert r.status_code == 200, r.text
        parts.append((n, r.headers["etag"].strip('"')))
    return user, up, blob, parts


async def test_a_complete_whose_answer_was_lost_after_storage_assembled_it_succeeds(
    storage_api: Api,
) -> None:
    """``complete`` assembles the parts in storage, then fails (the database or storage
    away next, the client's connection cut): storage has the whole object and forgets
    the multipart upload. Retried, ``complete`` succeeded nowhere: storage listed no
    part, so it answered 409 "parts not uploaded yet" for ever, and the status handed
    out URLs for parts of an upload storage no longer had. The video was lost."""
    from tellback_server.db.models import Attachment

    api = storage_api
    user, up, blob, parts = await _every_part_sent(api)
    # The first complete got as far as storage.
    async with api.state.db.session(write=False) as db:
        att = await db.get(Attachment, uuid.UUID(up["upload_id"]))
    assert att is not None
    assert att.multipart_upload_id is not None
    await api.state.store.complete_multipart(att.storage_key, att.multipart_upload_id, parts)
    # A client resuming from scratch is told there is nothing left to send...
    r = await api.http.get(f"/v1/client/uploads/{up['upload_id']}", headers=user)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending"
    assert r.json()["multipart"]["parts"] == []
    # ...and completing, again or for the first time as it sees it, succeeds.
    complete = f"/v1/client/uploads/{up['upload_id']}/complete"
    r = await api.http.post(complete, json={}, headers=user)
    assert r.status_code == 200, r.text
    await run_jobs(api)
    got = (await api.http.get(f"/v1/client/attachments/{up['upload_id']}", headers=user)).json()
    assert got["status"] == "ready"
    assert (await get(api, got["url"])).content == blob


async def test_two_completes_at_once_process_the_upload_once(
    storage_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that times out while storage assembles a large upload retries while the
    first ``complete`` still runs (the SDK's complete may be repeated). Both answer
    200 with the attachment, and it is processed once: two jobs could each rewrite and
    check the file, and one delete it after the other had marked it ready."""
    from tellback_server.db.models.ops import Job

    api = storage_api
    user, up, blob, _ = await _every_part_sent(api)
    store = api.state.store
    assemble = store.complete_multipart

    async def slowly(*args: Any, **kwargs: Any) -> None:  # storage takes its time
        await asyncio.sleep(0.3)
        await assemble(*args, **kwargs)

    monkeypatch.setattr(store, "complete_multipart", slowly)
    complete = f"/v1/client/uploads/{up['upload_id']}/complete"
    answers = await asyncio.gather(
        api.http.post(complete, json={}, headers=user),
        api.http.post(complete, json={}, headers=user),
    )
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    async with api.state.db.session(write=False) as db:
        jobs = (await db.scalars(select(Job).where(Job.kind == "media.process"))).all()
    assert [j.payload["attachment_id"] for j in jobs] == [up["upload_id"]]
    await run_jobs(api)
    got = (await api.http.get(f"/v1/client/attachments/{up['upload_id']}", headers=user)).json()
    assert got["status"] == "ready"
    assert (await get(api, got["url"])).content == blob


async def test_script_named_jpg_is_rejected_and_visible(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    script = b"#!/bin/sh\nrm -rf /\n"
    up = await start_upload(
        api, user, filename="cat.jpg", content_type="image/jpeg", size=len(script), kind="photo"
    )
    assert (await put(api, up["single"]["url"], script)).status_code == 200
    r = await api.http.post(f"/v1/client/uploads/{up['upload_id']}/complete", json={}, headers=user)
    assert r.status_code == 415
    assert r.json()["code"] == "unsupported_media_type"
    att = (await api.http.get(f"/v1/client/attachments/{up['upload_id']}", headers=user)).json()
    assert att["status"] == "rejected"
    assert "image/jpeg" in att["reason"]
    assert att["url"] is None
    await run_jobs(api)  # on S3, deleting the upload as sent (the copy checked went at once)
    for name in ("original", "sealed"):
        assert await api.state.store.stat(f"apps/{app.id}/att/{up['upload_id']}/{name}") is None


async def test_uploads_made_before_login_can_be_attached_after_it(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    installation = uuid.uuid4().hex
    anon = await api.user_headers(app, installation_id=installation)
    photo = jpeg_with_gps()
    up = await start_upload(
        api, anon, filename="a.jpg", content_type="image/jpeg", size=len(photo), kind="photo"
    )
    assert (await put(api, up["single"]["url"], photo, up["single"]["headers"])).status_code == 200
    r = await api.http.post(f"/v1/client/uploads/{up['upload_id']}/complete", json={}, headers=anon)
    assert r.status_code == 200, r.text
    token = identity_token(app.identity_secret, "logs-in", kid=app.identity_kid)
    ident = api.bearer(
        (await api.session(app, installation_id=installation, user_token=token))["session_token"]
    )
    conv = await api.feedback(ident, body="Sent after login", attachment_ids=[up["upload_id"]])
    assert [a["id"] for a in conv["last_message"]["attachments"]] == [up["upload_id"]]
    r = await api.http.get(f"/v1/client/attachments/{up['upload_id']}", headers=ident)
    assert r.status_code == 200, r.text
    # The retired anonymous session cannot read it any more.
    r = await api.http.get(f"/v1/client/attachments/{up['upload_id']}", headers=anon)
    assert r.status_code == 401


async def test_processing_announces_the_attachment_to_open_screens(storage_api: Api) -> None:
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    me = (await api.http.get("/v1/client/me", headers=user)).json()
    photo = jpeg_with_gps()
    up = await start_upload(
        api, user, filename="p.jpg", content_type="image/jpeg", size=len(photo), kind="photo"
    )
    assert (await put(api, up["single"]["url"], photo, up["single"]["headers"])).status_code == 200
    r = await api.http.post(f"/v1/client/uploads/{up['upload_id']}/complete", json={}, headers=user)
    assert r.status_code == 200, r.text
    conv = await api.feedback(user, body="See photo", attachment_ids=[up["upload_id"]])
    stream = api.state.events.subscribe_client(uuid.UUID(app.id), uuid.UUID(me["id"]))
    try:
        assert await run_jobs(api) == photo_jobs(api)  # no agent phone: no push job
        record = stream.queue.get_nowait()
    finally:
        api.state.events.unsubscribe(stream)
    assert record is not None
    assert record.type == "attachment.updated"
    assert record.client_data == {
        "attachment_id": up["upload_id"],
        "message_id": conv["last_message"]["id"],
        "conversation_id": conv["id"],
        "status": "ready",
        "reason": None,
    }
    assert "url" not in str(record.data)  # URLs expire; events are replayed for days


async def _local_store_user(
    api: Api, monkeypatch: pytest.MonkeyPatch, **limits: float
) -> dict[str, str]:
    """An end user of a new app, with the local store's body ``limits`` set (its
    module's names); skipped on S3, whose servers apply their own."""
    if api.state.settings.s3 is not None:
        pytest.skip("S3 servers apply their own timeouts; bytes never reach us")
    from tellback_server.domain.attachments import controllers

    for name, value in limits.items():
        monkeypatch.setattr(controllers, name, value)
    return await api.user_headers(await api.create_app())


async def test_a_stalled_upload_body_is_cut_with_408(
    storage_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = storage_api
    user = await _local_store_user(api, monkeypatch, UPLOAD_IDLE_SECONDS=0.3)
    up = await start_upload(
        api, user, filename="log.txt", content_type="text/plain", size=10, kind="file"
    )

    async def slow() -> AsyncIterator[bytes]:
        yield b"hello"
        await asyncio.sleep(1.0)  # the sender stalls
        yield b"world"

    r = await api.http.put(up["single"]["url"], content=slow(), headers=up["single"]["headers"])
    assert r.status_code == 408, r.text
    assert r.json()["code"] == "request_timeout"
    r = await api.http.post(f"/v1/client/uploads/{up['upload_id']}/complete", json={}, headers=user)
    assert r.status_code == 409  # nothing was stored: send it again
    r = await put(api, up["single"]["url"], b"helloworld", up["single"]["headers"])
    assert r.status_code == 200, r.text
    assert r.headers["etag"]


async def test_an_upload_body_trickled_below_the_minimum_rate_is_cut_with_408(
    storage_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every little while resets the idle clock for ever (slowloris): the body
    also has a grace period plus a second per UPLOAD_MIN_RATE bytes, and no more."""
    api = storage_api
    user = await _local_store_user(api, monkeypatch, UPLOAD_GRACE_SECONDS=2.0)
    size = 4000
    up = await start_upload(
        api, user, filename="log.txt", content_type="text/plain", size=size, kind="file"
    )
    sent = 0

    async def trickle(chunk: int, pause: float) -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(size // chunk):
            await asyncio.sleep(pause)  # well inside the idle limit (60 s)
            sent += chunk
            yield b"x" * chunk

    r = await api.http.put(
        up["single"]["url"], content=trickle(1, 0.05), headers=up["single"]["headers"]
    )
    assert r.status_code == 408, r.text
    assert "bytes a second" in r.json()["detail"]
    assert sent < 200  # cut after its 2 s (20 B/s, where 500 are asked), not 4,000 bytes
    # Above the rate it is not cut, though it takes longer than the grace period.
    r = await api.http.put(
        up["single"]["url"], content=trickle(1000, 0.7), headers=up["single"]["headers"]
    )
    assert r.status_code == 200, r.text
