"""The console in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium).

A live server (uvicorn in this event loop, in-process job worker) gets an app, an
agent and feedback with a real JPEG and a real H.264 video, uploaded through the
client API and processed by the worker. The browser signs in, opens the
conversation, sees the thumbnail (and the full-size photo) and the video with its
poster, replies and sees the reply; then the end user writes and the thread and
the inbox update live over the agent event stream, without a reload. A hostile
conversation (script tags, onerror, javascript: URLs) is opened too: no dialog
may ever fire. Screenshots go to $TELLBACK_TEST_ARTIFACTS or the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tellback_server.asgi import build_state, create_app
from tellback_server.http.server import Server
from tellback_server.plugins import build_registry
from tests.console.conftest import h264_mp4, jpeg, upload
from tests.console.test_xss import IMG, JS_URL, SCRIPT, SVG
from tests.server.conftest import _admin_token, make_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WAIT_MS = 15_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Live:
    base: str
    http: httpx.AsyncClient
    admin: dict[str, str]


@asynccontextmanager
async def live_server(sqlite_template: Path, tmp: Path) -> AsyncIterator[Live]:
    """`tellback serve` in this loop: uvicorn on 127.0.0.1, the worker in-process.

    The port is chosen first, so signed local-storage URLs point at this server.
    """
    port = _free_port()
    db = tmp / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    settings = make_settings(f"sqlite+aiosqlite:///{db}", tmp / "data", port=port)
    state = build_state(settings)
    app = create_app(settings, registry=build_registry(), run_worker=True, state=state)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = Server(config, on_stop=state.events.close)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            token = await _admin_token(state)
            yield Live(base, http, {"Authorization": f"Bearer {token}"})
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def artifacts_dir(tmp_path: Path) -> Path:
    configured = os.environ.get("TELLBACK_TEST_ARTIFACTS")
    path = Path(configured) / "console" if configured else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {path}")
    return path


async def wait_ready(live: Live, user: dict[str, str], attachment_id: str) -> dict[str, Any]:
    for _ in range(200):
        r = await live.http.get(f"/v1/client/attachments/{attachment_id}", headers=user)
        data: dict[str, Any] = r.json()
        if data["status"] != "processing":
            return data
        await asyncio.sleep(0.1)
    raise AssertionError(f"attachment {attachment_id} still processing")


@dataclass
class Scene:
    agent_token: str
    user: dict[str, str]
    conversation_id: str
    hostile_id: str


async def set_the_scene(live: Live) -> Scene:
    r = await live.http.post("/v1/admin/apps", json={"name": "Shop"}, headers=live.admin)
    app = r.json()
    r = await live.http.post(
        "/v1/admin/agents", json={"name": "Ada", "app_ids": [app["id"]]}, headers=live.admin
    )
    agent_token = r.json()["token"]
    r = await live.http.post(
        "/v1/client/sessions",
        json={
            "app_key": app["app_key"],
            "installation_id": uuid.uuid4().hex,
            "device": {"platform": "ios", "model": "iPhone16,1", "os_version": "18.2"},
        },
    )
    user = {"Authorization": f"Bearer {r.json()['session_token']}"}
    r = await live.http.patch("/v1/client/me", json={"name": "Grace"}, headers=user)
    photo = await upload(
        live.http, user, jpeg(), filename="screen.jpg", content_type="image/jpeg", kind="photo"
    )
    video = await upload(
        live.http, user, h264_mp4(), filename="bug.mp4", content_type="video/mp4", kind="video"
    )
    for attachment_id in (photo, video):
        assert (await wait_ready(live, user, attachment_id))["status"] == "ready"
    r = await live.http.post(
        "/v1/client/conversations",
        json={
            "body": "The checkout button does nothing. Photo and video attached.",
            "subject": "Checkout broken",
            "attachment_ids": [photo, video],
            "location": {"latitude": 52.52, "longitude": 13.405, "accuracy_m": 12},
            "context": {"app": {"version": "2.3.1"}, "network": {"type": "wifi"}},
        },
        headers=user,
    )
    assert r.status_code == 201, r.text
    conversation_id = r.json()["id"]
    r = await live.http.post(
        "/v1/client/conversations",
        json={
            "body": f"{SCRIPT} {JS_URL} {SVG}",
            "subject": IMG,
            "tags": [SVG],
            "location": {"latitude": 1, "longitude": 2, "label": IMG},
            "context": {"device": {"model": SCRIPT}},
        },
        headers=user,
    )
    assert r.status_code == 201, r.text
    return Scene(agent_token, user, conversation_id, r.json()["id"])


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing; .ci/run installs Debian's chromium")
        pytest.skip("/usr/bin/chromium is missing (apt-get install chromium)")
    return CHROMIUM


async def test_console_in_a_real_browser(
    chromium: Path, sqlite_template: Path, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    shots = artifacts_dir(tmp_path)
    dialogs: list[str] = []
    problems: list[str] = []
    async with live_server(sqlite_template, tmp_path) as live, async_playwright() as pw:
        scene = await set_the_scene(live)
        browser = await pw.chromium.launch(executable_path=str(chromium), args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(WAIT_MS)

            async def on_dialog(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.dismiss()

            page.on("dialog", on_dialog)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on(
                "response",
                lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None,
            )
            page.on(
                "console",
                lambda msg: problems.append(msg.text) if msg.type == "error" else None,
            )

            # --- sign in ----------------------------------------------------------------
            await page.goto(f"{live.base}/console/")
            await expect(page).to_have_url(re.compile(rf"^{live.base}/console/login\?next="))
            await page.fill("#token", scene.agent_token)
            await page.click("button[type=submit]")
            await expect(page).to_have_url(re.compile(rf"^{live.base}/console/?$"))
            row = page.locator(f'tr[data-conversation-id="{scene.conversation_id}"]')
            await expect(row).to_contain_text("Checkout broken")
            await expect(row).to_have_class("unread")
            await expect(page.locator("body")).to_have_attribute("data-live", "open")
            await page.screenshot(path=shots / "1-inbox.png", full_page=True)

            # --- the conversation: thumbnail, full-size photo, video with poster ----------
            await row.locator("a").click()
            await expect(page).to_have_url(f"{live.base}/console/c/{scene.conversation_id}")
            thumb = page.locator("button.thumb img")
            await expect(thumb).to_have_count(1)
            await page.wait_for_function(
                "() => { const i = document.querySelector('button.thumb img');"
                " return i && i.complete && i.naturalWidth > 0 }"
            )
            video = page.locator("video")
            storage_url = re.compile(rf"^{re.escape(live.base)}/v1/storage/")
            await expect(video).to_have_attribute("poster", storage_url)
            await expect(video).to_have_attribute("src", storage_url)
            await expect(video).to_have_attribute("controls", "")
            await page.wait_for_function(
                "() => document.querySelector('video').readyState >= 1"
            )  # the browser loaded the video's metadata: it is playable
            duration = await video.evaluate("v => v.duration")
            assert 1.5 <= duration <= 2.5, duration
            await expect(page.locator(".loc")).to_contain_text("± 12 m")
            await page.screenshot(path=shots / "2-conversation.png", full_page=True)
            await page.locator("button.thumb").click()
            await page.wait_for_function(
                "() => { const i = document.getElementById('lightbox-img');"
                " return document.getElementById('lightbox').open && i.complete"
                " && i.naturalWidth === 640 }"
            )
            await page.screenshot(path=shots / "3-photo-full-size.png")
            await page.locator("#lightbox button.close").click()
            await expect(page.locator("#lightbox")).not_to_have_attribute("open", "")

            # --- reply, and see it -------------------------------------------------------
            await page.fill("#reply-body", "Thanks Grace, a fix ships today.")
            await page.click("#reply-form button[type=submit]")
            reply = page.locator("li.msg-agent .body", has_text="a fix ships today")
            await expect(reply).to_be_visible()
            await expect(page.locator("#thread .status")).to_have_text("pending")
            await page.screenshot(path=shots / "4-replied.png", full_page=True)

            # --- the user answers: the thread updates live, without a reload ------------
            await expect(page.locator("body")).to_have_attribute("data-live", "open")
            await page.evaluate("() => { window.__sameDocument = true }")
            r = await live.http.post(
                f"/v1/client/conversations/{scene.conversation_id}/messages",
                json={"body": "Great, thank you!"},
                headers=scene.user,
            )
            assert r.status_code == 201, r.text
            live_message = page.locator("li.msg-user .body", has_text="Great, thank you!")
            await expect(live_message).to_be_visible()
            await expect(page.locator("#thread .status")).to_have_text("open")  # reopened
            await expect(page.locator("#controls-form select[name=status]")).to_have_value("open")
            assert await page.evaluate("() => window.__sameDocument === true")
            await page.screenshot(path=shots / "5-live-user-message.png", full_page=True)

            # --- the inbox updates live too ------------------------------------------------
            await page.goto(f"{live.base}/console/")
            await expect(page.locator("body")).to_have_attribute("data-live", "open")
            await page.evaluate("() => { window.__sameDocument = true }")
            r = await live.http.post(
                "/v1/client/conversations",
                json={"body": "Where is my order?", "subject": "Order status"},
                headers=scene.user,
            )
            assert r.status_code == 201, r.text
            new_row = page.locator(f'tr[data-conversation-id="{r.json()["id"]}"]')
            await expect(new_row).to_contain_text("Order status")
            first = page.locator("table.inbox tbody tr").first
            await expect(first).to_have_attribute("data-conversation-id", r.json()["id"])
            assert await page.evaluate("() => window.__sameDocument === true")
            await page.screenshot(path=shots / "6-inbox-live.png", full_page=True)

            # --- hostile input stays text ------------------------------------------------
            await page.goto(f"{live.base}/console/c/{scene.hostile_id}")
            await expect(page.locator("#thread h1")).to_have_text(IMG)
            await expect(page.locator("#thread .body")).to_contain_text(SCRIPT)
            await expect(page.locator("#thread .body")).to_contain_text(JS_URL)
            assert await page.locator("a[href^='javascript:']").count() == 0
            assert await page.locator("#thread img:not(button.thumb img)").count() == 0
            await page.wait_for_timeout(300)
            await page.screenshot(path=shots / "7-hostile-input.png", full_page=True)
        finally:
            await browser.close()
    assert dialogs == [], dialogs
    assert problems == [], problems
    assert len(list(shots.glob("*.png"))) == 7


async def test_sign_in_in_a_browser_never_leaves_the_console(
    chromium: Path, sqlite_template: Path, tmp_path: Path
) -> None:
    """``next=`` with dot segments, which the browser resolves out of ``/console``: the
    server drops it, and the page's script refuses such a retry even if it were given."""
    from playwright.async_api import Route, async_playwright, expect

    async with live_server(sqlite_template, tmp_path) as live, async_playwright() as pw:
        r = await live.http.post("/v1/admin/apps", json={"name": "Shop"}, headers=live.admin)
        r = await live.http.post(
            "/v1/admin/agents",
            json={"name": "Ada", "app_ids": [r.json()["id"]]},
            headers=live.admin,
        )
        agent_token = r.json()["token"]
        browser = await pw.chromium.launch(executable_path=str(chromium), args=FLAGS)
        try:
            for target in ["/console/../healthz", "/console/%2e%2e/healthz"]:
                context = await browser.new_context()
                page = await context.new_page()
                page.set_default_timeout(WAIT_MS)
                await page.goto(f"{live.base}/console/login?next={target}")
                await page.fill("#token", agent_token)
                await page.click("button[type=submit]")
                await expect(page).to_have_url(f"{live.base}/console/")
                await context.close()

            # The script alone: the login page as served, with a retry it must refuse.
            served: list[str] = []

            def with_retry(retry: str) -> Callable[[Route], Awaitable[None]]:
                async def handle(route: Route) -> None:
                    response = await route.fetch()
                    html = await response.text()
                    html = html.replace("<body ", f'<body data-retry="{retry}" ', 1)
                    served.append(retry)
                    await route.fulfill(response=response, body=html)

                return handle

            context = await browser.new_context()
            page = await context.new_page()
            page.set_default_timeout(WAIT_MS)
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            probe = f"{live.base}/console/login?probe=1"
            refused = [
                "/console/../healthz",
                "/console/%2e%2e/healthz",
                "/console/.%2E/healthz",
                "/console/c/..%2f..%2fhealthz",
                "/console/%zz",
            ]
            for retry in refused:
                await page.route("**/console/login?probe=*", with_retry(retry))
                await page.goto(probe)
                await page.wait_for_timeout(300)
                assert page.url == probe, (retry, page.url)
                await page.unroute("**/console/login?probe=*")
            assert served == refused
            assert [u for u in requested if "/console/" not in u] == [], requested
            # ... and follows a good one (the check is not refusing everything)
            await page.route("**/console/login?probe=*", with_retry("/console/login?retried=1"))
            await page.goto(probe)
            await expect(page).to_have_url(f"{live.base}/console/login?retried=1")
            await context.close()
        finally:
            await browser.close()
