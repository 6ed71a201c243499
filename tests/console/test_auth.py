"""Console sign-in, the session cookie, CSRF on every POST, and the cookie on the agent API."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from tellback_server.db.models import console_signouts
from tellback_server.domain.console import session as cs
from tellback_server.domain.console.controllers import SIGN_INS_PER_MINUTE
from tellback_server.domain.events import streams
from tellback_server.plugins import build_registry
from tellback_server.ratelimit import RateLimiter
from tellback_server.security import Sealer, b64url, hash_token
from tests.console.conftest import BASE, Console, csrf_of, open_console, world
from tests.server.conftest import Api, make_settings, serve_app
from tests.server.live import live_app, sse

pytestmark = pytest.mark.timeout(60)


def set_cookie(r: httpx.Response, name: str) -> str:
    headers = [h for h in r.headers.get_list("set-cookie") if h.startswith(f"{name}=")]
    assert len(headers) == 1, r.headers.get_list("set-cookie")
    return headers[0]


def attributes(header: str) -> dict[str, str]:
    parts = [p.strip() for p in header.split(";")]
    out = {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        out[k.lower()] = v
    return out


async def test_sign_in_sets_a_sealed_strict_httponly_cookie(api: Api, console: Console) -> None:
    w = await world(api)
    r = await console.sign_in(w.agent_token)
    assert r.status_code == 303
    assert r.headers["location"] == "/console/"
    header = set_cookie(r, cs.COOKIE)
    attrs = attributes(header)
    assert "httponly" in attrs
    assert attrs["samesite"].lower() == "strict"
    assert attrs["path"] == "/"
    assert "secure" not in attrs  # plain http, public URL http
    value = header.split(";", 1)[0].split("=", 1)[1].strip('"')
    # The cookie holds neither the token nor its hash in the clear.
    assert w.agent_token not in header
    assert hash_token(w.agent_token) not in header
    opened = cs.open_session(api.state.sealer, value)
    assert opened is not None
    assert opened.token_hash == hash_token(w.agent_token)
    inbox = await console.http.get("/console/")
    assert inbox.status_code == 200
    assert "Ada &lt;Lovelace&gt;" in inbox.text  # the agent's name, escaped


async def test_secure_cookie_over_https(api: Api) -> None:
    w = await world(api)
    async with open_console(api, base_url="https://127.0.0.1:8080") as console:
        page = await console.http.get("/console/login")
        login_cookie = set_cookie(page, cs.LOGIN_COOKIE)
        assert "secure" in attributes(login_cookie)
        r = await console.sign_in(w.agent_token)
        assert r.status_code == 303
        # Secure, so __Host-: only this host, over HTTPS, could have set it
        attrs = attributes(set_cookie(r, cs.SECURE_COOKIE))
        assert cs.SECURE_COOKIE == "__Host-tb_console"
        assert "secure" in attrs
        assert attrs["path"] == "/"
        assert "domain" not in attrs
        assert not [h for h in r.headers.get_list("set-cookie") if h.startswith(f"{cs.COOKIE}=")]
        assert (await console.http.get("/console/")).status_code == 200
        sealed = console.http.cookies[cs.SECURE_COOKIE]
        # the unprefixed name (which a sibling subdomain or http page could plant) is not read
        async with open_console(api, base_url="https://127.0.0.1:8080") as planted:
            planted.http.cookies.set(cs.COOKIE, sealed)
            assert (await planted.http.get("/console/")).status_code == 303
            r = await planted.http.get("/v1/agent/events")
            assert r.status_code == 401
        # signing out clears the __Host- cookie
        r = await console.post("/console/logout")
        assert r.status_code == 303
        cleared = attributes(set_cookie(r, cs.SECURE_COOKIE))
        assert cleared["max-age"] == "0"
        assert cleared["path"] == "/"


async def test_secure_cookie_when_the_public_url_is_https(api: Api) -> None:
    import dataclasses

    w = await world(api)
    original = api.state.settings
    api.state.settings = dataclasses.replace(original, public_url="https://feedback.example.com")
    try:
        async with open_console(api) as console:
            page = await console.http.get("/console/login")
            login_cookie = set_cookie(page, cs.LOGIN_COOKIE)
            assert "secure" in attributes(login_cookie)
            # a Secure cookie is not sent over plain http (as a browser would); send it by hand
            r = await console.http.post(
                "/console/login",
                data={"token": w.agent_token, "_csrf": csrf_of(page.text)},
                headers={"Cookie": login_cookie.split(";", 1)[0]},
            )
            assert r.status_code == 303
            assert "secure" in attributes(set_cookie(r, cs.SECURE_COOKIE))
    finally:
        api.state.settings = original


async def test_bad_token_is_refused_without_a_session(api: Api, console: Console) -> None:
    await world(api)
    for token in ["tbg_not-a-real-token", "tba_admin-looking", "", "x" * 500]:
        r = await console.sign_in(token)
        assert r.status_code == 401, token
        assert "That agent token is not valid." in r.text
        assert not [h for h in r.headers.get_list("set-cookie") if h.startswith(f"{cs.COOKIE}=")]
    assert (await console.http.get("/console/")).status_code == 303


class StoppedClock(RateLimiter):
    """The limiter with time standing still: what a burst admits, exactly."""

    def hit(self, key: str, per_minute: int, now: float | None = None) -> int | None:
        return super().hit(key, per_minute, now=1000.0)


async def test_sign_in_attempts_are_limited_per_address_and_failures_logged(
    api: Api, console: Console
) -> None:
    w = await world(api)
    api.state.limiter = StoppedClock()
    page = await console.http.get("/console/login")
    guess = "tbg_guess-" + "x" * 40
    statuses = []
    with capture_logs() as logs:
        for _ in range(10):
            r = await console.http.post(
                "/console/login", data={"token": guess, "_csrf": csrf_of(page.text)}
            )
            statuses.append(r.status_code)
            page = r if r.status_code == 401 else page
    # a burst of 10 s worth (one every 2 s), then nothing until time passes
    assert SIGN_INS_PER_MINUTE == 30
    assert statuses == [401] * 6 + [429] * 4
    # the console's own page, with its headers and when to try again
    assert r.headers["content-type"].startswith("text/html")
    assert "content-security-policy" in r.headers
    assert int(r.headers["retry-after"]) >= 1
    assert "Too many sign-in attempts" in r.text
    failed = [e for e in logs if e["event"] == "console.sign_in_failed"]
    assert [e["reason"] for e in failed] == ["token_not_valid"] * 6 + ["rate_limited"] * 4
    assert all(e["address"] == "127.0.0.1" for e in failed)
    assert "xxxxxxxx" not in repr(logs)  # never the token, nor part of it
    # the right token too, from this address, until the wait is over
    assert (await console.sign_in(w.agent_token)).status_code == 429
    # another address is not held back
    app = api.http._transport.app  # type: ignore[attr-defined]
    elsewhere = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
    async with httpx.AsyncClient(transport=elsewhere, base_url=BASE) as http:
        assert (await Console(http).sign_in(w.agent_token)).status_code == 303


async def test_login_form_needs_its_csrf_token(api: Api, console: Console) -> None:
    w = await world(api)
    # no token, a wrong token, no login cookie, a cross-site post: all 403, no session
    page = await console.http.get("/console/login")
    good = csrf_of(page.text)
    r = await console.http.post("/console/login", data={"token": w.agent_token})
    assert r.status_code == 403
    r = await console.http.post("/console/login", data={"token": w.agent_token, "_csrf": "x"})
    assert r.status_code == 403
    r = await console.http.post(
        "/console/login",
        data={"token": w.agent_token, "_csrf": good},
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert r.status_code == 403
    console.http.cookies.clear()
    r = await console.http.post("/console/login", data={"token": w.agent_token, "_csrf": good})
    assert r.status_code == 403
    assert "expired" in r.text
    assert (await console.http.get("/console/")).status_code == 303


def multipart(*parts: tuple[str, bytes, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body of (name, extra part headers, raw value) parts."""
    body = b"".join(
        b'--B\r\nContent-Disposition: form-data; name="%s"\r\n%s\r\n%s\r\n'
        % (name.encode(), headers, value)
        for name, headers, value in parts
    )
    return body + b"--B--\r\n", {"Content-Type": "multipart/form-data; boundary=B"}


async def test_a_form_whose_text_cannot_be_decoded_is_a_400(api: Api, console: Console) -> None:
    w = await world(api)
    cid = (await api.feedback(w.user))["id"]
    # before sign-in: bytes that are not UTF-8, and a charset nobody knows
    for part in [
        ("token", b"", b"\xff\xfe\xed\xa0\x80"),
        ("token", b"Content-Type: text/plain; charset=nope\r\n", b"x"),
    ]:
        body, headers = multipart(part)
        r = await console.http.post("/console/login", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert "character set" in r.text
        assert "content-security-policy" in r.headers
    # signed in: a reply that is not UTF-8 stores nothing
    assert (await console.sign_in(w.agent_token)).status_code == 303
    body, headers = multipart(("_csrf", b"", console.csrf.encode()), ("body", b"", b"\xff\xfe"))
    r = await console.http.post(f"/console/c/{cid}/reply", content=body, headers=headers)
    assert r.status_code == 400, r.text
    detail = (await api.http.get(f"/v1/agent/conversations/{cid}", headers=w.agent)).json()
    assert len(detail["messages"]) == 1
    # a well-formed multipart form still works
    body, headers = multipart(
        ("_csrf", b"", console.csrf.encode()), ("body", b"", "h\u00e9".encode())
    )
    r = await console.http.post(f"/console/c/{cid}/reply", content=body, headers=headers)
    assert r.status_code == 303, r.text


async def test_pages_without_a_session_go_to_sign_in(api: Api, console: Console) -> None:
    w = await world(api)
    conv = await api.feedback(w.user)
    for path in ["/console/", f"/console/c/{conv['id']}", "/console/inbox/rows"]:
        r = await console.http.get(path)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/console/login?next=%2Fconsole")
    # fetches from the page get a 401 (the script reloads into the sign-in page)
    r = await console.http.get("/console/inbox/rows", headers={"X-Console-Fragment": "1"})
    assert r.status_code == 401
    # a forged or foreign cookie is no session
    console.http.cookies.set(cs.COOKIE, "bm90LWEtc2VhbGVkLXZhbHVl")
    assert (await console.http.get("/console/")).status_code == 303
    other = Sealer("another-secret-key-0123456789abcdef0123456789")
    console.http.cookies.set(cs.COOKIE, cs.seal_session(other, hash_token(w.agent_token)))
    assert (await console.http.get("/console/")).status_code == 303


async def test_every_console_post_checks_csrf(api: Api, console: Console) -> None:
    w = await world(api)
    conv = await api.feedback(w.user, subject="Untouched")
    assert (await console.sign_in(w.agent_token)).status_code == 303
    posts = {
        f"/console/c/{conv['id']}/reply": {"body": "forged reply"},
        f"/console/c/{conv['id']}/update": {"status": "closed", "tags": "forged"},
        f"/console/c/{conv['id']}/read": {},
        "/console/logout": {},
    }
    # the app's routes: every console POST is in the list above
    app = api.http._transport.app  # type: ignore[attr-defined]
    console_posts = {
        route.path
        for route in app.routes
        if route.path.startswith("/console") and "POST" in route.methods
    }
    assert len(console_posts) == len(posts) + 1  # + /console/login (tested above)
    for path, form in posts.items():
        for token in [None, "wrong", console.csrf[:-2] + "xx"]:
            data = dict(form) if token is None else {**form, "_csrf": token}
            r = await console.http.post(path, data=data)
            assert r.status_code == 403, (path, token, r.text)
        r = await console.http.post(
            path, data={**form, "_csrf": console.csrf}, headers={"Sec-Fetch-Site": "cross-site"}
        )
        assert r.status_code == 403
    detail = (await api.http.get(f"/v1/agent/conversations/{conv['id']}", headers=w.agent)).json()
    assert [m["body"] for m in detail["messages"]] == ["The app crashes"]
    assert detail["status"] == "open"
    assert detail["tags"] == []
    assert detail["unread_count"] == 1
    # still signed in: logout was refused too
    assert (await console.http.get("/console/")).status_code == 200
    # the CSRF token of another session is not this session's
    async with open_console(api) as other:
        assert (await other.sign_in(w.agent_token)).status_code == 303
        assert other.csrf != console.csrf
        r = await console.post(f"/console/c/{conv['id']}/read", _csrf=other.csrf)
        assert r.status_code == 403


async def test_logout_clears_the_cookie(api: Api, console: Console) -> None:
    w = await world(api)
    assert (await console.sign_in(w.agent_token)).status_code == 303
    r = await console.post("/console/logout")
    assert r.status_code == 303
    assert r.headers["location"] == "/console/login"
    cleared = attributes(set_cookie(r, cs.COOKIE))
    assert cleared["max-age"] == "0"
    assert (await console.http.get("/console/")).status_code == 303


async def test_sign_out_ends_the_session_in_every_process(
    database_url: str, tmp_path: Path
) -> None:
    """Two servers on one database (SQLite, PostgreSQL): a copy of the cookie, taken
    before "Sign out" on one, is refused by both, pages and event stream alike."""
    settings = make_settings(database_url, tmp_path / "data")
    async with (
        serve_app(settings, build_registry(), base_url=BASE) as one,
        serve_app(settings, build_registry(), base_url=BASE) as two,
        open_console(one) as console,
        open_console(two) as thief,
        open_console(two) as elsewhere,
    ):
        w = await world(one)
        assert (await console.sign_in(w.agent_token)).status_code == 303
        assert (await elsewhere.sign_in(w.agent_token)).status_code == 303
        copied = console.http.cookies[cs.COOKIE]
        thief.http.cookies.set(cs.COOKIE, copied)
        assert (await thief.http.get("/console/")).status_code == 200
        assert (await console.post("/console/logout")).status_code == 303
        for server in (console, thief):
            server.http.cookies.set(cs.COOKIE, copied)
            r = await server.http.get("/console/")
            assert r.status_code == 303
            assert r.headers["location"].startswith("/console/login")
            r = await server.http.get("/console/inbox/rows", headers={"X-Console-Fragment": "1"})
            assert r.status_code == 401
            r = await server.http.get("/v1/agent/events")
            assert r.status_code == 401
            assert r.json()["code"] == "unauthenticated"
        r = await thief.http.post("/console/logout", data={"_csrf": console.csrf})
        assert r.status_code == 401
        # the agent's other sessions go on
        assert (await elsewhere.http.get("/console/")).status_code == 200


async def test_sign_outs_are_kept_until_their_cookie_expires(api: Api) -> None:
    db, sealer = api.state.db, api.state.sealer
    start = time.time()
    first = cs.open_session(sealer, cs.seal_session(sealer, "a" * 64, now=start), now=start)
    second = cs.open_session(sealer, cs.seal_session(sealer, "a" * 64, now=start), now=start)
    assert first is not None
    assert second is not None
    assert first.session_id != second.session_id
    await cs.sign_out(db, first, now=start)
    await cs.sign_out(db, first, now=start)  # twice (two tabs at once): no error

    async def kept() -> list[str]:
        async with db.session(write=False) as session:
            return list(await session.scalars(select(console_signouts.c.session_id)))

    assert await kept() == [first.session_id]
    # a sign-out after the first cookie's expiry (and an hour's grace) prunes it
    later = start + cs.SESSION_TTL_S + 3600 + 1
    await cs.sign_out(db, second, now=later)
    assert await kept() == [second.session_id]


def test_cookies_from_before_session_ids_are_refused() -> None:
    sealer = Sealer("a-secret-key-0123456789abcdef0123456789abcdef")
    old = b64url(sealer.seal(f"v1:{int(time.time())}:{'a' * 64}".encode(), "console-session"))
    assert cs.open_session(sealer, old) is None
    assert cs.open_session(sealer, cs.seal_session(sealer, "a" * 64)) is not None


async def test_session_expires_and_dies_with_the_agent(api: Api, console: Console) -> None:
    w = await world(api)
    sealer = api.state.sealer
    stale = cs.seal_session(sealer, hash_token(w.agent_token), now=time.time() - cs.SESSION_TTL_S)
    assert cs.open_session(sealer, stale) is None
    future = cs.seal_session(sealer, hash_token(w.agent_token), now=time.time() + 3600)
    assert cs.open_session(sealer, future) is None
    assert (await console.sign_in(w.agent_token)).status_code == 303
    r = await api.http.post(f"/v1/admin/agents/{w.agent_id}/rotate-token", headers=api.admin)
    assert r.status_code == 200, r.text
    assert (await console.http.get("/console/")).status_code == 303


async def test_cookie_never_authorizes_the_agent_api_except_the_event_stream(
    api: Api, console: Console
) -> None:
    w = await world(api)
    conv = await api.feedback(w.user)
    assert (await console.sign_in(w.agent_token)).status_code == 303
    cid = conv["id"]
    attempts = [
        ("GET", "/v1/agent/conversations", None),
        ("GET", f"/v1/agent/conversations/{cid}", None),
        ("GET", "/v1/agent/me", None),
        ("POST", f"/v1/agent/conversations/{cid}/messages", {"body": "via cookie"}),
        ("PATCH", f"/v1/agent/conversations/{cid}", {"status": "closed"}),
        ("POST", f"/v1/agent/conversations/{cid}/read", None),
        ("POST", "/v1/agent/events", None),
        ("PUT", "/v1/agent/devices/current", {"platform": "ios"}),
    ]
    for method, path, body in attempts:
        r = await console.http.request(method, path, json=body)
        assert r.status_code in {401, 405}, (method, path, r.status_code, r.text)
        if r.status_code == 401:
            assert r.json()["code"] == "unauthenticated"
    detail = (await api.http.get(f"/v1/agent/conversations/{cid}", headers=w.agent)).json()
    assert len(detail["messages"]) == 1
    assert detail["status"] == "open"
    # The stream takes the cookie only when it is a valid console session.
    console.http.cookies.set(cs.COOKIE, "tampered")
    r = await console.http.get("/v1/agent/events")
    assert r.status_code == 401
    # ... and a bearer header still wins over any cookie
    r = await console.http.get(
        "/v1/agent/conversations", headers={"Authorization": "Bearer tbg_wrong"}
    )
    assert r.status_code == 401


def test_csrf_tokens_are_bound_and_compared_safely() -> None:
    key = "k" * 40
    token = cs.csrf_token(key, "cookie-a")
    assert cs.csrf_matches(key, "cookie-a", token)
    assert not cs.csrf_matches(key, "cookie-b", token)
    assert not cs.csrf_matches("j" * 40, "cookie-a", token)
    assert not cs.csrf_matches(key, None, token)
    assert not cs.csrf_matches(key, "cookie-a", None)
    assert BASE.startswith("http://")


async def test_sign_in_returns_to_the_page_asked_for(api: Api, console: Console) -> None:
    w = await world(api)
    cid = (await api.feedback(w.user))["id"]
    r = await console.http.get(f"/console/c/{cid}", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 303
    assert r.headers["location"] == f"/console/login?next=%2Fconsole%2Fc%2F{cid}"
    # followed from another site: the page retries once, same-origin (Strict cookies)
    page = await console.http.get(r.headers["location"], headers={"Sec-Fetch-Site": "cross-site"})
    assert f'data-retry="/console/c/{cid}"' in page.text
    page = await console.http.get(r.headers["location"], headers={"Sec-Fetch-Site": "same-origin"})
    assert "data-retry" not in page.text
    r = await console.http.post(
        "/console/login",
        data={"token": w.agent_token, "_csrf": csrf_of(page.text), "next": f"/console/c/{cid}"},
    )
    assert r.status_code == 303
    assert r.headers["location"] == f"/console/c/{cid}"


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/console/",
        "/console/\\\\evil",
        "/console.evil.example",
        "/v1/admin/apps",
        # dot segments, which a browser resolves (%2e included) out of /console
        "/console/../healthz",
        "/console/%2e%2e/healthz",
        "/console/.%2E/healthz",
        "/console/c/%252e%252e/%252e%252e/healthz",
        "/console/./../v1/admin/apps",
        "/console/c/..%2f..%2fhealthz",
        "/console/..?x=1",
    ],
)
async def test_sign_in_never_redirects_off_the_console(
    api: Api, console: Console, target: str
) -> None:
    w = await world(api)
    page = await console.http.get("/console/login", params={"next": target})
    assert "evil" not in page.text
    assert "/v1/admin" not in page.text
    assert "healthz" not in page.text
    # nor does the page's same-origin retry (a link followed from another site)
    page = await console.http.get(
        "/console/login", params={"next": target}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert "data-retry" not in page.text
    r = await console.http.post(
        "/console/login",
        data={"token": w.agent_token, "_csrf": csrf_of(page.text), "next": target},
    )
    assert r.status_code == 303
    assert r.headers["location"] == "/console/"


async def test_sign_out_ends_an_event_stream_already_open(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream the console opened with its cookie rechecks that session like the
    agent's token: signing out ends it at the next check, not only its reconnect."""
    monkeypatch.setattr(streams, "RECHECK_SECONDS", 0.0)
    settings = make_settings(database_url, tmp_path / "data", sse_heartbeat_seconds=0.2)
    async with live_app(settings) as live:
        w = await world(live)
        async with httpx.AsyncClient(base_url=str(live.http.base_url)) as http:
            console = Console(http)
            assert (await console.sign_in(w.agent_token)).status_code == 303
            async with sse(http, "/v1/agent/events", {}) as stream:
                await asyncio.sleep(0.5)
                assert (await console.post("/console/logout")).status_code == 303
                with pytest.raises(EOFError):
                    await stream.next(wait=5)
