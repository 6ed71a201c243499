"""Feedback is untrusted input: every user-controlled string is escaped, no link is made of it."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import pytest

from tests.console.conftest import Console, run_jobs, upload, world
from tests.server.conftest import Api

pytestmark = pytest.mark.timeout(60)

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
JS_URL = "javascript:alert(document.cookie)"
SVG = "<svg/onload=alert(1)>"


async def hostile_conversation(api: Api) -> tuple[Any, dict[str, Any]]:
    w = await world(api, custom_fields=[{"key": "order_id", "type": "string", "label": SCRIPT}])
    r = await api.http.patch(
        "/v1/client/me", json={"name": IMG, "email": "x@example.com"}, headers=w.user
    )
    assert r.status_code == 200, r.text
    filename = f"{IMG}{SVG}.txt"
    log = await upload(
        api.http, w.user, b"hello\n", filename=filename, content_type="text/plain", kind="log"
    )
    conv = await api.feedback(
        w.user,
        f"{SCRIPT}\nclick {JS_URL} now",
        subject=IMG,
        tags=[SVG],
        attachment_ids=[log],
        custom_fields={"order_id": SCRIPT},
        location={"latitude": 1, "longitude": 2, "accuracy_m": 3, "label": IMG},
        context={"device": {"model": SVG, IMG: "key with markup"}, "extra": {"x": [SCRIPT]}},
    )
    await run_jobs(api)
    return w, conv


class Elements(HTMLParser):
    """Every start tag with its attributes, as a browser's tokenizer sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def assert_inert(page: str) -> None:
    for raw in [SCRIPT, IMG, SVG, "<img src=x", "<svg"]:
        assert raw not in page, raw
    parser = Elements()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    assert "svg" not in tags
    assert tags.count("script") == 1
    for tag, attrs in parser.tags:
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name)  # no event handler anywhere
            if name in {"href", "src", "action", "poster", "data-full", "formaction"}:
                assert (value or "").startswith(("/", "http://", "https://", "#")), (tag, value)
        if tag == "script":
            assert attrs == [("src", "/console/static/console.js"), ("defer", None)]
        if tag == "img":
            assert dict(attrs).get("src") != "x"


async def test_conversation_page_escapes_everything(api: Api, console: Console) -> None:
    w, conv = await hostile_conversation(api)
    assert (await console.sign_in(w.agent_token)).status_code == 303
    page = (await console.http.get(f"/console/c/{conv['id']}")).text
    assert_inert(page)
    # ... and the text is still there, escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;svg/onload=alert(1)&gt;" in page
    assert JS_URL in page  # as text, not as a link
    live = (await console.http.get(f"/console/c/{conv['id']}/live")).text
    for raw in [SCRIPT, IMG, SVG]:
        assert raw not in live


async def test_inbox_escapes_everything(api: Api, console: Console) -> None:
    w, _ = await hostile_conversation(api)
    assert (await console.sign_in(w.agent_token)).status_code == 303
    page = (await console.http.get("/console/")).text
    assert_inert(page)
    assert "&lt;script&gt;" in page  # the preview of the body
    rows = (await console.http.get("/console/inbox/rows")).text
    for raw in [SCRIPT, IMG, SVG]:
        assert raw not in rows
    # filter values echo back into the form escaped
    page = (await console.http.get("/console/", params={"q": IMG, "tag": SCRIPT})).text
    assert_inert(page)


async def test_reply_and_error_pages_escape(api: Api, console: Console) -> None:
    w, conv = await hostile_conversation(api)
    assert (await console.sign_in(w.agent_token)).status_code == 303
    r = await console.post(f"/console/c/{conv['id']}/reply", body=SCRIPT)
    assert r.status_code == 303
    page = (await console.http.get(f"/console/c/{conv['id']}")).text
    assert_inert(page)
    r = await console.post(f"/console/c/{conv['id']}/update", tags=SCRIPT + ",x" * 30)
    assert r.status_code == 422
    assert_inert(r.text)
    r = await console.post(f"/console/c/{conv['id']}/reply", body=SCRIPT + "x" * 10_001)
    assert r.status_code == 422
    assert_inert(r.text)
