"""The console against the in-process app: sign-in, forms with CSRF tokens, media uploads."""

from __future__ import annotations

import html
import io
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
from PIL import Image

from tellback_server.jobs.worker import Worker
from tellback_server.plugins import build_registry
from tests.server.conftest import Api, AppInfo, make_settings, serve_app

BASE = "http://127.0.0.1:8080"  # local storage URLs point here; the client routes it to the app
_CSRF_INPUT = re.compile(r'name="_csrf" value="([^"]*)"')
_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


@pytest.fixture
async def api(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[Api]:
    """The app on a fresh SQLite copy, with the built-in job kinds (media processing)."""
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    settings = make_settings(f"sqlite+aiosqlite:///{db}", tmp_path / "data")
    async with serve_app(settings, build_registry(), base_url=BASE) as served:
        yield served


def csrf_of(page: str) -> str:
    tokens = [t for t in _CSRF_META.findall(page) + _CSRF_INPUT.findall(page) if t]
    assert tokens, "no CSRF token on the page"
    return html.unescape(tokens[0])


@dataclass
class Console:
    """A browser-like client of the console: its own cookie jar."""

    http: httpx.AsyncClient
    csrf: str = ""

    async def sign_in(self, token: str) -> httpx.Response:
        page = await self.http.get("/console/login")
        assert page.status_code == 200, page.text
        r = await self.http.post(
            "/console/login", data={"token": token, "_csrf": csrf_of(page.text)}
        )
        if r.status_code == 303:
            inbox = await self.http.get("/console/")
            assert inbox.status_code == 200, inbox.text
            self.csrf = csrf_of(inbox.text)
        return r

    async def post(self, path: str, **form: str) -> httpx.Response:
        return await self.http.post(path, data={"_csrf": self.csrf, **form})


@asynccontextmanager
async def open_console(api: Api, base_url: str = BASE) -> AsyncIterator[Console]:
    """A second client of the same app (same transport), with a cookie jar of its own."""
    transport = api.http._transport  # the app's ASGI transport
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as http:
        yield Console(http)


@pytest.fixture
async def console(api: Api) -> AsyncIterator[Console]:
    async with open_console(api) as opened:
        yield opened


@dataclass
class World:
    app: AppInfo
    other_app: AppInfo
    agent_id: str
    agent_token: str
    agent: dict[str, str]
    user: dict[str, str]


async def world(api: Api, **settings: Any) -> World:
    app = await api.create_app("Shop", **settings)
    other = await api.create_app("Elsewhere")
    r = await api.http.post(
        "/v1/admin/agents",
        json={"name": "Ada <Lovelace>", "app_ids": [app.id]},
        headers=api.admin,
    )
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    user = await api.user_headers(app)
    return World(app, other, r.json()["id"], token, api.bearer(token), user)


def jpeg(width: int = 640, height: int = 480) -> bytes:
    image = Image.new("RGB", (width, height), (30, 120, 200))
    for x in range(0, width, 40):
        for y in range(height):
            image.putpixel((x, y), (250, 250, 250))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def h264_mp4(frames: int = 24, width: int = 160, height: int = 120, fps: int = 12) -> bytes:
    """A real, browser-playable H.264 MP4 (libx264 from PyAV's bundled FFmpeg)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i in range(frames):
            image = Image.new("RGB", (width, height), (i * 10 % 256, 90, 200))
            frame = av.VideoFrame.from_image(image)  # type: ignore[no-untyped-call]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


async def upload(
    http: httpx.AsyncClient,
    user: dict[str, str],
    data: bytes,
    *,
    filename: str,
    content_type: str,
    kind: str,
) -> str:
    """The client upload flow (create, PUT, complete); returns the upload id."""
    r = await http.post(
        "/v1/client/uploads",
        json={"filename": filename, "content_type": content_type, "size": len(data), "kind": kind},
        headers={**user, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 201, r.text
    up = r.json()
    r = await http.put(up["single"]["url"], content=data, headers=up["single"]["headers"])
    assert r.status_code == 200, r.text
    r = await http.post(f"/v1/client/uploads/{up['upload_id']}/complete", json={}, headers=user)
    assert r.status_code in {200, 415}, r.text
    upload_id: str = up["upload_id"]
    return upload_id


async def run_jobs(api: Api) -> int:
    return await Worker(api.state, build_registry()).run_until_idle()
