"""Console pages: inbox filters, scoping, the thread with media, replies and controls."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import msgspec
import pytest

from tellback_server.domain.attachments.schemas import AttachmentOut
from tellback_server.domain.console.pages import security_headers, storage_origin
from tellback_server.domain.console.views import attachment_view, when
from tellback_server.settings import S3Settings, Settings
from tests.console.conftest import Console, h264_mp4, jpeg, run_jobs, upload, world
from tests.server.conftest import Api

pytestmark = pytest.mark.timeout(60)


def conversation_ids(page: str) -> list[str]:
    return re.findall(r'data-conversation-id="([0-9a-f-]{36})"', page)


async def test_inbox_lists_newest_first_with_filters_and_search(api: Api, console: Console) -> None:
    w = await world(api)
    second_app = await api.create_app("Second")
    r = await api.http.patch(
        f"/v1/admin/agents/{w.agent_id}",
        json={"app_ids": [w.app.id, second_app.id]},
        headers=api.admin,
    )
    assert r.status_code == 200, r.text
    other_user = await api.user_headers(second_app)
    a = await api.feedback(w.user, "Checkout crashes", subject="Checkout", tags=["billing"])
    b = await api.feedback(w.user, "Dark mode please", tags=["Feature"])
    c = await api.feedback(other_user, "Login loops forever", subject="Login")
    hidden = await api.feedback(await api.user_headers(w.other_app), "Not for Ada")
    r = await api.http.patch(
        f"/v1/agent/conversations/{b['id']}",
        json={"status": "solved", "assignee_id": w.agent_id},
        headers=w.agent,
    )
    assert r.status_code == 200, r.text
    assert (await console.sign_in(w.agent_token)).status_code == 303

    async def ids(query: str = "") -> list[str]:
        r = await console.http.get(f"/console/?{query}")
        assert r.status_code == 200, r.text
        return conversation_ids(r.text)

    # b was updated last (updated_at) but the inbox orders by activity: c is newest
    assert await ids() == [c["id"], b["id"], a["id"]]
    assert hidden["id"] not in await ids()
    assert await ids(f"app={second_app.id}") == [c["id"]]
    assert await ids(f"app={w.other_app.id}") == []  # not the agent's app: nothing
    assert await ids("status=solved") == [b["id"]]
    assert await ids("status=open") == [c["id"], a["id"]]
    assert await ids("tag=billing") == [a["id"]]
    assert await ids("tag=feature") == [b["id"]]  # tags match case-insensitively
    assert await ids("q=crash") == [a["id"]]
    assert await ids("q=login") == [c["id"]]
    assert await ids("mine=1") == [b["id"]]
    assert await ids("app=not-a-uuid&status=bogus") == [c["id"], b["id"], a["id"]]
    # unread markers: a, c unread (one user message each); b was not replied to either
    page = (await console.http.get("/console/")).text
    assert page.count('class="unread"') == 3
    # the rows fragment (what the live update fetches) carries the same filters
    rows = await console.http.get("/console/inbox/rows?status=open")
    assert rows.status_code == 200
    assert conversation_ids(rows.text) == [c["id"], a["id"]]
    assert rows.text.lstrip().startswith('<div id="inbox-list">')


async def test_inbox_pages_with_a_cursor(api: Api, console: Console) -> None:
    w = await world(api)
    made = []
    for i in range(27):
        user = w.user if i < 10 else await api.user_headers(w.app)  # within the user rate limit
        made.append((await api.feedback(user, f"message {i}"))["id"])
    assert (await console.sign_in(w.agent_token)).status_code == 303
    first = await console.http.get("/console/")
    assert len(conversation_ids(first.text)) == 25
    older = re.search(r'href="/console/\?([^"]+)">Older', first.text)
    assert older
    second = await console.http.get("/console/?" + older.group(1).replace("&amp;", "&"))
    seen = conversation_ids(first.text) + conversation_ids(second.text)
    assert seen == list(reversed(made))


async def test_another_apps_conversation_is_not_found(api: Api, console: Console) -> None:
    w = await world(api)
    foreign = await api.feedback(await api.user_headers(w.other_app), "Secret of another app")
    assert (await console.sign_in(w.agent_token)).status_code == 303
    fid = foreign["id"]
    for path in [f"/console/c/{fid}", f"/console/c/{fid}/live", f"/console/c/{uuid.uuid4()}"]:
        r = await console.http.get(path)
        assert r.status_code == 404, path
        assert "Secret of another app" not in r.text
    for path, form in [
        (f"/console/c/{fid}/reply", {"body": "hello"}),
        (f"/console/c/{fid}/update", {"status": "closed"}),
        (f"/console/c/{fid}/read", {}),
    ]:
        r = await console.post(path, **form)
        assert r.status_code == 404, path
    other_agent = await api.create_agent(w.other_app, name="Bo")
    detail = (await api.http.get(f"/v1/agent/conversations/{fid}", headers=other_agent[1])).json()
    assert len(detail["messages"]) == 1
    assert detail["status"] == "open"


async def test_reply_note_and_controls(api: Api, console: Console) -> None:
    w = await world(api)
    conv = await api.feedback(w.user, "It broke", subject="Broken")
    cid = conv["id"]
    assert (await console.sign_in(w.agent_token)).status_code == 303
    page = await console.http.get(f"/console/c/{cid}")
    assert page.status_code == 200
    assert "It broke" in page.text
    r = await console.post(f"/console/c/{cid}/reply", body="Thanks, looking into it")
    assert r.status_code == 303
    assert r.headers["location"].startswith(f"/console/c/{cid}#m-")
    r = await console.post(f"/console/c/{cid}/reply", body="customer is on v2", internal="1")
    assert r.status_code == 303
    r = await console.post(
        f"/console/c/{cid}/update",
        status="solved",
        priority="high",
        tags="billing, ios ,billing",
        assignee="me",
    )
    assert r.status_code == 303
    detail = (await api.http.get(f"/v1/agent/conversations/{cid}", headers=w.agent)).json()
    assert [(m["body"], m["internal"]) for m in detail["messages"]] == [
        ("It broke", False),
        ("Thanks, looking into it", False),
        ("customer is on v2", True),
    ]
    assert detail["status"] == "solved"
    assert detail["priority"] == "high"
    assert detail["tags"] == ["billing", "ios"]
    assert detail["assignee_id"] == w.agent_id
    # the user sees the public reply only
    mine = (await api.http.get(f"/v1/client/conversations/{cid}/messages", headers=w.user)).json()
    assert [m["body"] for m in mine["items"]] == ["It broke", "Thanks, looking into it"]
    page = await console.http.get(f"/console/c/{cid}")
    assert "internal note" in page.text
    assert "customer is on v2" in page.text
    r = await console.post(f"/console/c/{cid}/update", assignee="none")
    assert r.status_code == 303
    detail = (await api.http.get(f"/v1/agent/conversations/{cid}", headers=w.agent)).json()
    assert detail["assignee_id"] is None
    assert detail["tags"] == ["billing", "ios"]  # a form without tags leaves them


async def test_a_stale_controls_form_changes_only_what_the_agent_changed(
    api: Api, console: Console
) -> None:
    w = await world(api)
    cid = (await api.feedback(w.user, tags=["a"]))["id"]
    assert (await console.sign_in(w.agent_token)).status_code == 303
    page = (await console.http.get(f"/console/c/{cid}")).text
    assert '<input type="hidden" name="status_was" value="open">' in page
    # meanwhile, through the API: solved and high
    r = await api.http.patch(
        f"/v1/agent/conversations/{cid}",
        json={"status": "solved", "priority": "high"},
        headers=w.agent,
    )
    assert r.status_code == 200
    # the page, still showing open/normal, only edits the tags
    r = await console.post(
        f"/console/c/{cid}/update",
        status="open",
        status_was="open",
        priority="normal",
        priority_was="normal",
        tags="a, b",
        tags_was="a",
        assignee="keep",
    )
    assert r.status_code == 303
    detail = (await api.http.get(f"/v1/agent/conversations/{cid}", headers=w.agent)).json()
    assert (detail["status"], detail["priority"], detail["tags"]) == ("solved", "high", ["a", "b"])


async def test_invalid_forms_show_the_error_and_keep_the_draft(api: Api, console: Console) -> None:
    w = await world(api)
    cid = (await api.feedback(w.user))["id"]
    assert (await console.sign_in(w.agent_token)).status_code == 303
    r = await console.post(f"/console/c/{cid}/reply", body="   ")
    assert r.status_code == 422
    assert 'role="alert"' in r.text
    long = "x" * 10_001
    r = await console.post(f"/console/c/{cid}/reply", body=long)
    assert r.status_code == 422
    assert long in r.text  # the draft comes back
    r = await console.post(f"/console/c/{cid}/update", status="exploded")
    assert r.status_code == 422
    r = await console.post(f"/console/c/{cid}/update", tags=",".join(f"t{i}" for i in range(30)))
    assert r.status_code == 422
    detail = (await api.http.get(f"/v1/agent/conversations/{cid}", headers=w.agent)).json()
    assert len(detail["messages"]) == 1
    assert detail["tags"] == []
    # U+0000 (PostgreSQL cannot store it), pasted unseen from a log: the reply goes without.
    r = await console.post(f"/console/c/{cid}/reply", body="see the log:\x00 line 3")
    assert r.status_code == 303, r.text
    detail = (await api.http.get(f"/v1/agent/conversations/{cid}", headers=w.agent)).json()
    assert detail["messages"][-1]["body"] == "see the log: line 3"


async def test_opening_marks_read(api: Api, console: Console) -> None:
    w = await world(api)
    cid = (await api.feedback(w.user))["id"]
    assert (await console.sign_in(w.agent_token)).status_code == 303
    page = await console.http.get(f"/console/c/{cid}")
    assert 'data-unread="1"' in page.text
    r = await console.http.post(f"/console/c/{cid}/read", headers={"X-CSRF-Token": console.csrf})
    assert r.status_code == 204
    page = await console.http.get(f"/console/c/{cid}")
    assert 'data-unread="0"' in page.text


async def test_thread_shows_media_files_location_context_and_states(
    api: Api, console: Console
) -> None:
    w = await world(api, custom_fields=[{"key": "order_id", "type": "string"}])
    photo = await upload(
        api.http, w.user, jpeg(), filename="IMG_1.jpg", content_type="image/jpeg", kind="photo"
    )
    video = await upload(
        api.http, w.user, h264_mp4(), filename="clip.mp4", content_type="video/mp4", kind="video"
    )
    log = await upload(
        api.http, w.user, b"line 1\nline 2\n", filename="app.log", content_type="text/plain",
        kind="log",
    )  # fmt: skip
    # bytes that pass the type check but are no image: rejected while processing
    broken = await upload(
        api.http, w.user, b"\xff\xd8\xff" + b"\x00" * 64, filename="broken.jpg",
        content_type="image/jpeg", kind="photo",
    )  # fmt: skip
    conv = await api.feedback(
        w.user,
        "See attached",
        attachment_ids=[photo, video, log, broken],
        location={"latitude": 52.52, "longitude": 13.405, "accuracy_m": 15, "label": "Office"},
        custom_fields={"order_id": "A-1"},
        context={"device": {"model": "iPhone16,1", "battery": 0.5}, "network": {"type": "wifi"}},
    )
    cid = conv["id"]
    assert (await console.sign_in(w.agent_token)).status_code == 303
    before = (await console.http.get(f"/console/c/{cid}")).text
    assert before.count("processing…") == 4  # shown, never hidden
    await run_jobs(api)
    page = (await console.http.get(f"/console/c/{cid}")).text
    # photo: a thumbnail button that opens the original
    assert re.search(r'<button type="button" class="thumb" data-full="http://127\.0\.0\.1', page)
    assert 'alt="IMG_1.jpg"' in page
    # video: playable, with its poster frame
    video_tag = re.search(r"<video [^>]*>", page)
    assert video_tag
    assert "controls" in video_tag.group(0)
    assert 'poster="http://127.0.0.1:8080/v1/storage/' in video_tag.group(0)
    assert 'src="http://127.0.0.1:8080/v1/storage/' in video_tag.group(0)
    # log: a download link
    assert 'download="app.log"' in page
    # rejected: the state and the reason
    assert "Rejected:" in page
    assert "broken.jpg" in page
    # the location with accuracy and a map link, custom fields and context in the panel
    assert "52.520000, 13.405000" in page
    assert "± 15 m" in page
    assert "https://www.openstreetmap.org/?mlat=52.520000&amp;mlon=13.405000" in page
    assert "Office" in page
    assert "order_id" in page
    assert "A-1" in page
    assert "iPhone16,1" in page
    assert "wifi" in page
    # the media URLs are fetchable (what the browser loads)
    for url in re.findall(r'(?:src|poster|data-full)="(http://127\.0\.0\.1:8080[^"]+)"', page):
        r = await api.http.get(url.replace("&amp;", "&"))
        assert r.status_code == 200, url


async def test_security_headers_on_every_console_response(api: Api, console: Console) -> None:
    w = await world(api)
    cid = (await api.feedback(w.user))["id"]
    responses = [await console.http.get("/console/login")]
    responses.append(await console.http.get("/console/"))  # redirect to sign-in
    await console.sign_in(w.agent_token)
    paths = ["/console/", f"/console/c/{cid}", f"/console/c/{uuid.uuid4()}"]
    responses.extend([await console.http.get(path) for path in paths])
    responses.append(await console.http.get("/console/static/console.js"))
    for r in responses:
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "'unsafe-inline'" not in csp
        assert "frame-ancestors 'none'" in csp
        assert "img-src 'self' http://127.0.0.1:8080" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-content-type-options"] == "nosniff"
    page = responses[2].text
    assert "<script>" not in page  # no inline script at all
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/console/static/console.js" defer>']
    js = responses[-1]
    assert js.headers["content-type"].startswith("text/javascript")
    assert "EventSource" in js.text
    css = await console.http.get("/console/static/console.css")
    assert css.headers["content-type"].startswith("text/css")
    assert (await console.http.get("/console/static/../asgi.py")).status_code == 404
    assert (await console.http.get("/console/static/nope.js")).status_code == 404


async def test_routing_errors_under_console_are_console_pages(api: Api, console: Console) -> None:
    w = await world(api)
    cid = (await api.feedback(w.user))["id"]
    assert (await console.sign_in(w.agent_token)).status_code == 303
    for method, path, status in [
        ("GET", "/console/nope", 404),
        ("GET", "/console/c/not-a-uuid", 404),
        ("GET", f"/console/c/{cid}/nope", 404),
        ("GET", "/console/inbox/nope", 404),
        ("GET", "/console/static/", 404),
        ("GET", f"/console/c/{cid}/reply", 405),
        ("PUT", f"/console/c/{cid}/update", 405),
        ("DELETE", "/console/logout", 405),
        ("POST", "/console/", 405),
    ]:
        r = await console.http.request(method, path)
        assert r.status_code == status, (method, path, r.status_code)
        assert r.headers["content-type"].startswith("text/html"), (method, path)
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["cache-control"] == "no-store"
        assert "Back to the inbox" in r.text
        if status == 405:
            assert r.headers["allow"], (method, path)
    # the API's routing errors stay problem+json: its clients depend on it
    for method, path, status in [
        ("GET", "/v1/nope", 404),
        ("GET", "/consoles", 404),
        ("GET", "/v1/agent/conversations/not-a-uuid", 404),
        ("DELETE", "/healthz", 405),
    ]:
        r = await api.http.request(method, path, headers=w.agent)
        assert r.status_code == status, (method, path, r.status_code)
        assert r.headers["content-type"] == "application/problem+json", (method, path)
        assert "content-security-policy" not in r.headers


def test_storage_origin_in_the_policy() -> None:
    local = Settings(secret_key="k" * 40, public_url="https://tb.example.com/base")
    assert storage_origin(local) == "https://tb.example.com"
    s3 = Settings(
        secret_key="k" * 40,
        s3=S3Settings("s3.example.com:9000", "a", "b", "tellback", secure=True, region=None),
    )
    assert storage_origin(s3) == "https://s3.example.com:9000"
    csp = security_headers(s3)["Content-Security-Policy"]
    assert "media-src 'self' https://s3.example.com:9000" in csp
    bad = Settings(
        secret_key="k" * 40,
        s3=S3Settings("evil.example; script-src *", "a", "b", "t", secure=False, region=None),
    )
    assert storage_origin(bad) is None
    assert "script-src *" not in security_headers(bad)["Content-Security-Policy"]


def test_svg_is_never_shown_inline() -> None:
    import datetime as dt

    att = AttachmentOut(
        id=uuid.uuid4(),
        kind="photo",
        filename="x.svg",
        content_type="image/svg+xml",
        size=10,
        status="ready",
        reason=None,
        width=None,
        height=None,
        duration_s=None,
        url="http://127.0.0.1:8080/v1/storage/a",
        thumbnail_url=None,
        expires_at=None,
        created_at=dt.datetime.now(dt.UTC),
    )
    assert attachment_view(att).display == "download"
    # defence in depth: a URL that is not http(s) is never put in src or href
    evil = attachment_view(msgspec.structs.replace(att, url="javascript:alert(1)"))
    assert evil.url is None
    assert evil.display == "none"


async def test_svg_uploads_are_refused(api: Api) -> None:
    w = await world(api)
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    for kind in ["photo", "file"]:
        r = await api.http.post(
            "/v1/client/uploads",
            json={"filename": "x.svg", "content_type": "image/svg+xml", "size": len(svg),
                  "kind": kind},
            headers=w.user,
        )  # fmt: skip
        assert r.status_code == 415, r.text


async def test_assigning_to_a_teammate_by_name(api: Api, console: Console) -> None:
    w = await world(api)
    grace_id, grace = await api.create_agent(w.app, name="Grace")
    eve_id, _ = await api.create_agent(w.other_app, name="Eve")  # another app's agent
    gone_id, _ = await api.create_agent(w.app, name="Gone")
    r = await api.http.patch(
        f"/v1/admin/agents/{gone_id}", json={"disabled": True}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    conv = await api.feedback(w.user, "Assign me")
    # The agent API behind the dropdown: the app's active agents, the caller's apps only.
    r = await api.http.get(f"/v1/agent/apps/{w.app.id}/agents", headers=w.agent)
    assert r.status_code == 200, r.text
    assert sorted(a["name"] for a in r.json()) == ["Ada <Lovelace>", "Grace"]
    r = await api.http.get(f"/v1/agent/apps/{w.other_app.id}/agents", headers=w.agent)
    assert r.status_code == 404
    assert (await console.sign_in(w.agent_token)).status_code == 303
    page = (await console.http.get(f"/console/c/{conv['id']}")).text
    assert f'value="agent:{grace_id}">Grace<' in page
    assert eve_id not in page
    assert gone_id not in page
    r = await console.post(f"/console/c/{conv['id']}/update", assignee=f"agent:{grace_id}")
    assert r.status_code == 303
    detail = (await api.http.get(f"/v1/agent/conversations/{conv['id']}", headers=grace)).json()
    assert detail["assignee_id"] == grace_id
    assert "<dd>Grace</dd>" in (await console.http.get(f"/console/c/{conv['id']}")).text
    # A forged option for another app's agent is refused by the API's own check.
    r = await console.post(f"/console/c/{conv['id']}/update", assignee=f"agent:{eve_id}")
    assert r.status_code in {400, 422}
    detail = (await api.http.get(f"/v1/agent/conversations/{conv['id']}", headers=grace)).json()
    assert detail["assignee_id"] == grace_id


def test_times_are_shown_in_utc_whatever_was_stored() -> None:
    """A time without an offset is UTC; one with no UTC equivalent (stored before the API
    refused them, ``0001-01-01T00:00:00+01:00``) is shown as given, never a 500."""
    naive = dt.datetime(2026, 11, 28, 10, 15)  # noqa: DTZ001 (the case under test)
    assert when(naive) == "2026-11-28 10:15 UTC"
    east = dt.datetime(2026, 11, 28, 10, 15, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert when(east) == "2026-11-28 08:15 UTC"
    year_one = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert when(year_one) == "0001-01-01T00:00:00+01:00"
    assert when(None) == ""
