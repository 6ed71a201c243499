"""Hypothesis over every route of the agent console, as ``tests/reliability/test_fuzz.py``
runs Schemathesis over the JSON API (the console is not in the OpenAPI document).

The app runs in this process on a SQLite database, then on a PostgreSQL one, seeded
through the public API: an app with an agent (and a teammate, and a disabled agent), an
end user and a conversation with hostile text, a photo, a file, a location, context, a
reply and an internal note; a second conversation of the same app that only refused
requests may name; and another app with its agent and a conversation. Requests go
straight to the ASGI app (no socket), the path and query string as raw bytes as a server
hands them over (ASCII: uvicorn refuses other bytes in the request line).

Each test draws cases for one route (derandomized, so CI replays the same ones):

* pages and fragments (``GET /console/``, ``/console/inbox/rows``, ``/console/c/{id}``,
  ``/console/c/{id}/live``, ``/console/login``, ``/console/static/{name}``): query strings
  of the filters, the search, pagination cursors (real keys, out-of-range times, junk)
  and ``next``, with very long values, NUL, lone surrogates percent-encoded, invalid
  ``%`` escapes, numbers out of range; path ids of the conversations, of other objects
  and of nothing, in each spelling a UUID parser takes, and ids that are no UUID;
* forms (reply and internal note; status, priority, tags and assignment; mark read; sign
  out): missing, extra, repeated and very long fields, raw bytes, urlencoded and multipart
  bodies with unknown, wrong and mislabelled charsets, multipart without or with the
  wrong boundary, truncated, file parts, JSON, plain text, junk, a body over the limit;
* sign-in: an agent's token (padded, another app's agent's) or not (a disabled agent's,
  the admin's, an end user's, junk); ``next`` targets that try to leave the console; the
  sign-in form's CSRF token or another; client addresses old and new (the rate limit);
* any method on any path under ``/console``;

each with a valid session cookie, a signed-out, expired, foreign-key, disabled agent's or
old-format one (with its own CSRF token), junk, a wrong name, or none; over http or
https; with the CSRF token in the form or the header, missing, wrong, truncated, another
session's or the sign-in form's; with cross-site fetch metadata and hostile headers
(Host included).

Checks on every response: no 5xx and no exception out of the app; a 2xx is an HTML page
(or a static file, or an empty 204); a 3xx has a Location on the same origin, under
``/console`` as a browser resolves it (percent-encoded dots included), and so has any
``next`` it carries; a 4xx is the console's HTML error page; every page has the
console's security headers, is UTF-8, and holds no injected markup (no script but the
console's own, no event handler, no link off the page's origins, no other app's
conversation). A request that is certainly refused (no valid session, no valid CSRF
token, or cross-site) is never answered 2xx or 3xx (a GET may go to sign-in) and shows
no conversation; sign-in succeeds only with an agent's token and the form's token, and
only then sets a session cookie. After each test the seeded state no case may change
(the guarded and the foreign conversation, the other app's inbox, the agents) is as it
was, and the test's cases must have reached the route's successes, not only its 403s.

The bugs it found (three 500s, one of them a request with no answer at all) are fixed;
each is also a plain regression test at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urljoin, urlsplit

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tellback_server.domain.console import session as cs
from tellback_server.http.pagination import encode_cursor
from tellback_server.plugins import build_registry
from tellback_server.security import Sealer, b64url, hash_token
from tests.conftest import fresh_database
from tests.console.conftest import Console, jpeg, open_console, run_jobs, upload, world
from tests.console.test_auth import multipart
from tests.console.test_xss import IMG, JS_URL, SCRIPT, SVG
from tests.server.conftest import SECRET, Api, make_settings, serve_app

pytestmark = [pytest.mark.timeout(120)]

T = TypeVar("T")

HOST = "127.0.0.1:8080"
BASE = f"http://{HOST}"
MAX_BODY = 1 << 20  # Settings.max_request_body_bytes' default
# Unique text in the seeded conversations: a page that shows one holds it.
PLAYGROUND_TEXT = "Playground-7c1e: the app broke"
GUARDED_TEXT = "Guarded-41d9: nobody may change this"
FOREIGN_TEXT = "Foreign-93b2: the secret of another app"
PAYLOADS = [
    SCRIPT,
    IMG,
    SVG,
    JS_URL,
    "\"'><script>alert(2)</script>",
    "</textarea><ScRiPt>alert(3)</ScRiPt>",
    "<a href=//evil.example>x</a>",
    "<meta http-equiv=refresh content='0;url=//evil.example'>",
]
SPECIAL = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "%",
    "%%",
    "%zz",
    "%00",
    "%2500",
    "%ff",
    "%ED%A0%80",
    "+",
    "&",
    "=",
    ";",
    "..",
    "../..",
    "\r\nSet-Cookie: x=1",
    "-1",
    "0",
    "1",
    "-99999999999999999999",
    "99999999999999999999999999",
    "1e309",
    "NaN",
    "null",
    "[]",
    "{}",
    "true",
    "\ufeff",
    "\u202e",
    "\ud800",
    "\udfff",
    "\U0001f642",
    "\u00e9\u00df",
    "{{ 7 * 7 }}",
]
NEXT_TARGETS = [
    "/console/",
    "/console",
    "/console?x=1",
    "/console/c/00000000-0000-0000-0000-000000000000",
    "/console/../healthz",
    "/console/%2e%2e/healthz",
    "/console/.%2E/healthz",
    "/console/c/%252e%252e/%252e%252e/healthz",
    "/console/./../v1/admin/apps",
    "/console/..?x=1",
    "/console/\\\\evil.example",
    "/console.evil.example",
    "//evil.example/console/",
    "https://evil.example/console/",
    "/console/%0d%0aSet-Cookie:x=1",
    "/console/\tx",
    "/console//evil.example",
    "javascript:alert(1)//console/",
    "/v1/admin/apps",
]
URL_ATTRIBUTES = {"href", "src", "action", "poster", "data-full", "formaction", "data-retry"}
CONSOLE_SCRIPT = [("src", "/console/static/console.js"), ("defer", None)]
STATIC_TYPES = {"text/javascript", "text/css", "image/svg+xml"}
NOT_UUIDS = """not-a-uuid %zz % .. %2e%2e %2F -1 0 %ED%A0%80 %00
    5f0c6f0e-8a5b-4d7e-9a44-0d1f3c2b7a6 5f0c6f0e-8a5b-4d7e-9a44-0d1f3c2b7a667
    g0000000-0000-0000-0000-000000000000"""
OTHER_HEADERS = """x-request-id accept origin referer user-agent accept-language x-forwarded-for
    x-forwarded-proto forwarded x-http-method-override"""


def fuzz(examples: int) -> settings:
    """Reproducible (derandomized, no example database), unhurried, and bounded."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# Placeholders a case holds where a secret or a per-request value goes; resolved when the
# request is made, so a failing case prints no secret and replays against a new session.
SESSION = "{session}"  # a session cookie minted for this request
SESSION_NAME = "{session-name}"  # the session cookie's name for the request's scheme
CSRF = "{csrf}"  # the CSRF token of the session cookie the case sends
TOKEN = "{token}"  # the signed-in agent's token
TOKEN_PADDED = "{token:padded}"
TOKEN_OTHER_APP = "{token:eve}"  # another app's agent: a valid sign-in too
SIGNS_IN = {TOKEN, TOKEN_PADDED, TOKEN_OTHER_APP}
UNIQUE_ADDRESS = ("{unique}", 0)  # a client address no request had before
LOGIN_CSRF = "{csrf:login}"  # the sign-in form's token for the case's login cookie
BAD_COOKIES = ["{ended}", "{expired}", "{foreign-key}", "{disabled}", "{v1}"]
BAD_CSRF = ["{csrf:other}", "{csrf:truncated}", LOGIN_CSRF]
BAD_TOKENS = ["{token:disabled}", "{token:admin}", "{token:session}", "{token:truncated}"]


# ----- the app, seeded -------------------------------------------------------------------


@dataclass
class Seeded:
    app_id: str
    other_app_id: str
    agent_id: str
    grace_id: str
    eve_id: str
    gone_id: str
    user_id: str
    playground: str
    guarded: str
    foreign: str
    message_id: str
    attachment_id: str
    keys: list[tuple[dt.datetime, str]]  # (last activity, id) of each conversation: cursors
    secrets: dict[str, str]  # placeholder -> value, for those that do not change per request
    agent_headers: dict[str, str]
    eve_headers: dict[str, str]

    def ids(self) -> dict[str, str]:
        """Path ids by what they are."""
        return {
            "playground": self.playground,
            "guarded": self.guarded,
            "foreign": self.foreign,
            "app": self.app_id,
            "other_app": self.other_app_id,
            "agent": self.agent_id,
            "grace": self.grace_id,
            "user": self.user_id,
            "message": self.message_id,
            "attachment": self.attachment_id,
            "nil": "00000000-0000-0000-0000-000000000000",
            "random": "5f0c6f0e-8a5b-4d7e-9a44-0d1f3c2b7a66",
        }


async def seed(api: Api) -> Seeded:
    w = await world(api, custom_fields=[{"key": "order_id", "type": "string", "label": SCRIPT}])
    grace_id, _ = await api.create_agent(w.app, name=f"Grace {IMG}")
    eve_id, eve = await api.create_agent(w.other_app, name="Eve")
    r = await api.http.post(
        "/v1/admin/agents", json={"name": "Gone", "app_ids": [w.app.id]}, headers=api.admin
    )
    assert r.status_code == 201, r.text
    gone_id, gone_token = r.json()["id"], r.json()["token"]
    r = await api.http.patch(
        "/v1/client/me", json={"name": IMG, "email": "x@example.com"}, headers=w.user
    )
    assert r.status_code == 200, r.text
    photo = await upload(
        api.http,
        w.user,
        jpeg(64, 48),
        filename=f"{SVG}.jpg",
        content_type="image/jpeg",
        kind="photo",
    )
    log = await upload(
        api.http, w.user, b"line\n", filename=f"{IMG}.log", content_type="text/plain", kind="log"
    )
    playground = await api.feedback(
        w.user,
        f"{PLAYGROUND_TEXT} {SCRIPT} {JS_URL}",
        subject=IMG,
        tags=[SVG],
        attachment_ids=[photo, log],
        custom_fields={"order_id": SCRIPT},
        location={"latitude": 52.52, "longitude": 13.405, "accuracy_m": 15, "label": IMG},
        context={"device": {"model": SVG, IMG: "key"}, "extra": {"x": [SCRIPT]}},
    )
    pid = playground["id"]
    for body in [{"body": f"Thanks {SCRIPT}"}, {"body": f"note {IMG}", "internal": True}]:
        r = await api.http.post(
            f"/v1/agent/conversations/{pid}/messages", json=body, headers=w.agent
        )
        assert r.status_code == 201, r.text
    r = await api.http.post(
        f"/v1/client/conversations/{pid}/messages",
        json={"body": "here now", "location": {"latitude": -33.9, "longitude": 151.2}},
        headers=w.user,
    )
    assert r.status_code == 201, r.text
    guarded = await api.feedback(w.user, GUARDED_TEXT, subject="Guarded", tags=["keep"])
    other_user = await api.user_headers(w.other_app)
    foreign = await api.feedback(other_user, FOREIGN_TEXT, subject="Foreign", tags=["theirs"])
    await run_jobs(api)
    r = await api.http.get(f"/v1/agent/conversations/{pid}", headers=w.agent)
    assert r.status_code == 200, r.text
    detail = r.json()
    attachments = [a["id"] for m in detail["messages"] for a in m["attachments"]]
    assert len(attachments) == 2, detail
    r = await api.http.get("/v1/agent/conversations", headers=w.agent)
    keys = [(dt.datetime.fromisoformat(c["last_activity_at"]), c["id"]) for c in r.json()["items"]]
    assert len(keys) == 2, r.text

    # the cookies that are no session: signed out, expired, sealed under another key,
    # of an agent disabled since, and of the format before session ids
    sealer = api.state.sealer
    async with open_console(api) as console:
        assert (await console.sign_in(w.agent_token)).status_code == 303
        ended = console.http.cookies[cs.COOKIE]
        other_csrf = console.csrf
        assert (await console.post("/console/logout")).status_code == 303
    expired = cs.seal_session(
        sealer, hash_token(w.agent_token), now=time.time() - cs.SESSION_TTL_S - 5
    )
    foreign_key = cs.seal_session(
        Sealer("another-secret-key-0123456789abcdef0123456789"), hash_token(w.agent_token)
    )
    disabled = cs.seal_session(sealer, hash_token(gone_token))
    r = await api.http.patch(
        f"/v1/admin/agents/{gone_id}", json={"disabled": True}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    v1 = b64url(
        sealer.seal(
            f"v1:{int(time.time())}:{hash_token(w.agent_token)}".encode(), "console-session"
        )
    )
    session_token = w.user["Authorization"].removeprefix("Bearer ")
    secrets = {
        TOKEN: w.agent_token,
        TOKEN_PADDED: f"  {w.agent_token}\r\n",
        TOKEN_OTHER_APP: eve["Authorization"].removeprefix("Bearer "),
        "{token:disabled}": gone_token,
        "{token:admin}": api.admin_token,
        "{token:session}": session_token,
        "{token:truncated}": w.agent_token[:-1],
        "{ended}": ended,
        "{expired}": expired,
        "{foreign-key}": foreign_key,
        "{disabled}": disabled,
        "{v1}": v1,
        "{csrf:other}": other_csrf,
    }
    return Seeded(
        app_id=w.app.id,
        other_app_id=w.other_app.id,
        agent_id=w.agent_id,
        grace_id=grace_id,
        eve_id=eve_id,
        gone_id=gone_id,
        user_id=detail["end_user"]["id"],
        playground=pid,
        guarded=guarded["id"],
        foreign=foreign["id"],
        message_id=detail["messages"][0]["id"],
        attachment_id=attachments[0],
        keys=keys,
        secrets=secrets,
        agent_headers=w.agent,
        eve_headers=eve,
    )


async def snapshot(api: Api, s: Seeded) -> dict[str, Any]:
    """What no fuzzed request may change: the guarded and the foreign conversation (with
    their messages), the other app's inbox, and the agents' standing."""
    out: dict[str, Any] = {}
    reads = [
        ("guarded", f"/v1/agent/conversations/{s.guarded}", s.agent_headers),
        ("foreign", f"/v1/agent/conversations/{s.foreign}", s.eve_headers),
        ("other app's inbox", "/v1/agent/conversations", s.eve_headers),
        ("agent", "/v1/agent/me", s.agent_headers),
        ("other app's agent", "/v1/agent/me", s.eve_headers),
    ]
    for name, path, headers in reads:
        r = await api.http.get(path, headers=headers)
        assert r.status_code == 200, (name, r.text)
        out[name] = r.json()
    r = await api.http.get(f"/v1/admin/agents/{s.gone_id}", headers=api.admin)
    assert r.status_code == 200, r.text
    out["disabled agent"] = r.json()
    return out


# ----- raw ASGI requests ------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1 or name == "set-cookie", (name, values)
        return values[0] if values else None

    @property
    def media_type(self) -> str:
        return (self.header("content-type") or "").split(";", 1)[0].strip().lower()


async def call(
    app: Any,
    method: str,
    scheme: str,
    raw_path: bytes,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    client: tuple[str, int] | None,
) -> Reply:
    """One request to the ASGI app, as uvicorn hands it over: the raw path and query string,
    the path percent-decoded (UTF-8, errors replaced), the body in chunks."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": client,
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""]
    done = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, f"{len(starts)} response starts"
    assert sent[-1]["type"] == "http.response.body", "the response did not end"
    assert not sent[-1].get("more_body", False), "the response did not end"
    return Reply(
        status=starts[0]["status"],
        headers=[
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in starts[0]["headers"]
        ],
        body=b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
    )


# ----- cases ------------------------------------------------------------------------------

Field = tuple[str, str | bytes]


@dataclass(frozen=True)
class Body:
    kind: str  # urlencoded, multipart, json, text, junk, none, oversize
    fields: tuple[Field, ...] = ()
    charset: str | None = None  # the Content-Type's charset parameter
    part_headers: tuple[bytes, ...] = ()  # multipart: extra headers of each part, in turn
    boundary: str | None = "b0undary"  # multipart: None is a Content-Type without one
    mismatched: bool = False  # multipart: the parts use another boundary
    truncated: bool = False  # multipart: without its closing delimiter
    junk: bytes = b""  # appended (urlencoded, multipart) or the whole body (junk)
    content_type: bytes | None = None  # junk: the Content-Type sent


@dataclass(frozen=True)
class Case:
    route: str  # for the tally: login, inbox, rows, conversation, live, static, reply, ...
    method: str
    path: tuple[str, ...]  # segments after /console/, raw (percent-encoded) or "{id:<what>}"
    query: bytes = b""
    cookies: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body: Body | None = None
    scheme: str = "http"
    client: tuple[str, int] | None = ("127.0.0.1", 50000)

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def cross_site(self) -> bool:
        return any(v in {"cross-site", "same-site"} for v in self.header_values("sec-fetch-site"))

    def session_name(self) -> str:
        return cs.cookie_name(self.scheme == "https")

    @property
    def has_session(self) -> bool:
        """A valid session cookie under the name the console reads for this scheme."""
        name = self.session_name()
        return any(v == SESSION and n in {name, SESSION_NAME} for n, v in self.cookies)

    def mentions(self, placeholder: str) -> bool:
        fields = self.body.fields if self.body else ()
        return any(v == placeholder for _, v in fields) or any(
            v == placeholder for _, v in self.headers
        )


def pct(value: str | bytes) -> bytes:
    """Percent-encoded, lone surrogates as the (invalid) UTF-8 of their code points."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    return quote(raw, safe="").encode("ascii")


def weighted(*options: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, each as often as its weight says."""
    pool = [s for n, s in options for _ in range(n)]
    return st.sampled_from(pool).flatmap(lambda s: s)


def hostile_text(extra: Sequence[str] = ()) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([*extra, *PAYLOADS, *SPECIAL]),
        st.text(max_size=30),
        st.text(st.characters(categories=["Cs", "Cc", "Co", "Zs", "Mn", "So"]), max_size=12),
        st.builds(
            lambda c, n: c * n,
            st.sampled_from(["x", "\u00e9", "<", "%", "\U0001f642", " "]),
            st.sampled_from([201, 501, 1001, 10_001, 40_000]),
        ),
        st.integers(-(2**80), 2**80).map(str),
        st.uuids().map(str),
    )


def cursors(s: Seeded) -> st.SearchStrategy[str]:
    """Real keys, keys of times out of range or without an offset, and junk."""
    offsets = st.sampled_from([0, 1, -1, 14, -12]).map(lambda h: dt.timezone(dt.timedelta(hours=h)))
    times = st.datetimes(timezones=offsets) | st.sampled_from(
        [
            dt.datetime.min.replace(tzinfo=dt.timezone(dt.timedelta(hours=1))),
            dt.datetime.max,  # noqa: DTZ901 (no offset: the cursor's decoder refuses it)
        ]
    )
    real = st.sampled_from(s.keys).map(lambda k: encode_cursor(k[0], uuid.UUID(k[1])))
    forged = st.builds(encode_cursor, times, st.uuids() | st.just(uuid.UUID(s.keys[0][1])))
    shapes = st.one_of(
        st.tuples(st.datetimes().map(dt.datetime.isoformat), st.uuids().map(str)).map(list),
        st.lists(hostile_text() | st.integers() | st.none(), max_size=3),
        st.dictionaries(st.sampled_from(["at", "id"]), hostile_text(), max_size=2),
        hostile_text(),
    ).map(lambda v: b64url(json.dumps(v).encode()))
    return st.one_of(real, forged, shapes, hostile_text(["=", "====", "e30", "W10="]))


def query_strings(
    keys: Sequence[str], values: Callable[[str], st.SearchStrategy[str]]
) -> st.SearchStrategy[bytes]:
    """Each of the route's keys one time in two, then others (or the same again), in any
    order, encoded properly; raw junk; both."""
    present = st.tuples(*[st.tuples(st.just(k), values(k), st.booleans()) for k in keys]).map(
        lambda ps: [(k, v) for k, v, keep in ps if keep]
    )
    key = weighted((1, st.sampled_from(list(keys))), (2, hostile_text()))
    extra = st.lists(key.flatmap(lambda k: st.tuples(st.just(k), values(k))), max_size=3)
    encoded = (
        st.builds(lambda p, e: p + e, present, extra)
        .flatmap(st.permutations)
        .map(lambda ps: b"&".join(pct(k) + b"=" + pct(v) for k, v in ps))
    )
    pieces = b"% %z %zz %e9 %ff%fe %ED%A0%80 %00 %2500 + & = && == ; # ? q status app cursor next"
    junk = st.lists(st.sampled_from(pieces.split()), max_size=12).map(b"".join)
    return weighted(
        (4, encoded), (1, junk), (1, st.builds(lambda a, b: a + b"&" + b, encoded, junk))
    )


def path_id(kinds: Sequence[str]) -> st.SearchStrategy[str]:
    """A path segment where a conversation id goes: an id (of the kind, in one of the
    spellings a UUID parser takes) or, one time in seven, something that is no UUID."""
    spelled = st.tuples(
        st.sampled_from(list(kinds)),
        st.sampled_from(["", "", "", "upper", "hex", "braces", "urn"]),
    ).map(lambda t: f"{{id:{t[0]}:{t[1]}}}")
    other = st.one_of(
        hostile_text().map(lambda v: pct(v).decode()),
        st.sampled_from([*NOT_UUIDS.split(), "9" * 400]),
    )
    return st.tuples(spelled, other, st.sampled_from([False] * 6 + [True])).map(
        lambda t: t[1] if t[2] else t[0]
    )


def headers(csrf_header: bool) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    value = st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
        max_size=40,
    )
    site = st.sampled_from(["same-origin", "cross-site", "same-site", "none", "CROSS-SITE"])
    options: list[st.SearchStrategy[tuple[str, str]]] = [
        st.tuples(st.just("sec-fetch-site"), site | value),
        st.tuples(st.just("x-console-fragment"), st.sampled_from(["1", "0", "true"]) | value),
        st.tuples(st.sampled_from(OTHER_HEADERS.split()), value),
    ]
    if csrf_header:
        options.append(
            st.tuples(st.just("x-csrf-token"), st.sampled_from([CSRF, *BAD_CSRF]) | value)
        )
    hosts = st.sampled_from(
        [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1",
            "[::1]:8080",
            "",
            "a b",
            "\u00e9",
            "127.0.0.1:99999",
            "127.0.0.1:abc",
            "[",
            ":",
            "x" * 300,
        ]
    )
    options.append(st.tuples(st.just("host"), hosts | value))
    some = st.lists(st.one_of(options), max_size=3).map(tuple)
    return weighted((2, st.just(())), (1, some))


def cookies(login: bool = False) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    valid = st.just((SESSION_NAME, SESSION))
    names = st.sampled_from([SESSION_NAME, cs.COOKIE, cs.SECURE_COOKIE])
    bad = st.tuples(
        names,
        st.sampled_from(BAD_COOKIES)
        | st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters=";,\x7f"),
            max_size=40,
        ),
    )
    nonce = st.tuples(
        st.just(cs.LOGIN_COOKIE),
        st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=";,"),
            min_size=1,
            max_size=40,
        ),
    )
    wrong_name = st.tuples(
        st.sampled_from([cs.COOKIE, cs.SECURE_COOKIE, "TB_CONSOLE"]), st.just(SESSION)
    )
    one = st.one_of(valid, bad, nonce, wrong_name)
    if login:
        return weighted(
            (5, st.tuples(nonce)), (1, st.lists(one, max_size=3).map(tuple)), (1, st.just(()))
        )
    # a cookie that is no session, alone: the CSRF token the case sends is its own (a copy
    # of a page taken before sign-out, say), so only the session check can refuse it
    stale = st.tuples(st.tuples(st.just(SESSION_NAME), st.sampled_from(BAD_COOKIES)))
    return weighted(
        (6, st.tuples(valid)),
        (1, st.tuples(valid, nonce)),
        (2, stale),
        (2, st.lists(one, max_size=3).map(tuple)),
        (1, st.just(())),
    )


def bodies(
    names: Sequence[str],
    values: Callable[[str], st.SearchStrategy[str]],
    csrf: Sequence[str],
    required: Sequence[str] = (),
) -> st.SearchStrategy[Body]:
    """Form bodies: the ``required`` fields (each left out one time in five), then the
    route's fields and others, repeated, very long, raw bytes; the CSRF token first, last,
    twice or not at all; in every encoding a browser or a forger sends."""
    name = weighted((5, st.sampled_from(list(names))), (1, hostile_text(["_csrf\x00", "_CSRF"])))
    known = name.flatmap(lambda n: st.tuples(st.just(n), values(n)))
    raw_value = st.tuples(
        st.sampled_from(list(names)),
        st.binary(max_size=24) | st.sampled_from([b"+2AA-", b"a+2D3YAA-", b"\\udfff", b"\xc3\xa9"]),
    )  # (lone surrogates in UTF-7 and in Python's escapes)
    present = st.tuples(
        *[st.tuples(st.just(n), values(n), st.sampled_from([True] * 4 + [False])) for n in required]
    ).map(lambda fs: [(n, v) for n, v, keep in fs if keep])
    csrf_field = st.tuples(
        st.sampled_from(["_csrf"] * 5 + ["_csrf\x00", "_CSRF"]), st.sampled_from(list(csrf))
    )
    csrf_fields = weighted(
        (6, st.just([("_csrf", csrf[0])])),
        (1, st.just([])),
        (2, st.lists(csrf_field, max_size=3)),
    )
    fields = st.builds(
        lambda c, r, f, first: tuple(c + r + f if first else r + f + c),
        csrf_fields,
        present,
        st.lists(weighted((5, known), (1, raw_value)), max_size=4),
        st.booleans(),
    )
    part_header = st.sampled_from(
        [
            b"",
            b"",
            b"",
            b"FILE",
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Type: text/plain; charset=latin-1\r\n",
            b"Content-Type: text/plain; charset=nope\r\n",
            b"Content-Type: text/plain; charset=utf-16\r\n",
            b"Content-Type: text/plain; charset=utf-7\r\n",
            b"Content-Type: text/plain; charset=unicode_escape\r\n",
            b"Content-Type: text/plain; charset=\r\n",
            b"Content-Type: application/octet-stream\r\n",
            b"Content-Transfer-Encoding: base64\r\n",
            b"X-\xff: \xfe\r\n",
        ]
    )
    charset = st.none() | st.sampled_from(["utf-8", "latin-1", "nope", "utf-16", ""])
    junk = st.binary(max_size=40) | st.sampled_from(
        [b"%", b"%zz&=&", b"a=%ff%fe", b"--", b"\r\n\r\n", b"=" * 50, b"&" * 200]
    )
    urlencoded = st.builds(Body, st.just("urlencoded"), fields, charset, junk=st.just(b"") | junk)
    multipart = st.builds(
        Body,
        st.just("multipart"),
        fields,
        charset,
        st.lists(part_header, max_size=3).map(tuple),
        st.sampled_from(["b0undary", "b0undary", "", "x" * 80, '"quoted"', "\u00e9"]) | st.none(),
        st.booleans(),
        st.booleans(),
        st.just(b"") | junk,
    )
    other = st.builds(Body, st.sampled_from(["json", "text", "none"]), fields)
    raw = st.builds(
        Body,
        st.just("junk"),
        junk=junk,
        content_type=st.sampled_from(
            [
                b"application/x-www-form-urlencoded",
                b"multipart/form-data",
                b"multipart/form-data; boundary=",
                b"multipart/mixed; boundary=x",
                b"application/json",
                b"text/html; charset=\xff",
                b"*/*",
                b";;;",
            ]
        )
        | st.none(),
    )
    oversize = st.builds(Body, st.just("oversize"), fields)
    return weighted((8, urlencoded), (3, multipart), (1, other), (1, raw), (1, oversize))


def encode(body: Body, resolve: Callable[[str | bytes], str | bytes]) -> tuple[bytes, bytes | None]:
    """The body's bytes and its Content-Type."""
    fields = [(k, resolve(v)) for k, v in body.fields]
    if body.kind in {"urlencoded", "oversize"}:
        content = b"&".join(pct(k) + b"=" + pct(v) for k, v in fields)
        if body.kind == "oversize":
            content += b"&pad=" + b"x" * MAX_BODY
        if body.junk:
            content += b"&" + body.junk
        ctype = b"application/x-www-form-urlencoded"
        if body.charset is not None:
            ctype += b"; charset=" + body.charset.encode()
        return content, ctype
    if body.kind == "multipart":
        return encode_multipart(body, fields)
    if body.kind == "json":
        text = {k: v if isinstance(v, str) else v.decode("latin-1") for k, v in fields}
        return json.dumps(text).encode(), b"application/json"
    if body.kind == "text":
        return b"&".join(pct(k) + b"=" + pct(v) for k, v in fields), b"text/plain"
    if body.kind == "junk":
        return body.junk, body.content_type
    return b"", None


def encode_multipart(body: Body, fields: list[tuple[str, str | bytes]]) -> tuple[bytes, bytes]:
    boundary = (body.boundary or "b0undary").encode("utf-8")
    used = b"other-boundary" if body.mismatched else boundary
    parts = []
    for i, (k, v) in enumerate(fields):
        extra = body.part_headers[i % len(body.part_headers)] if body.part_headers else b""
        disposition = b'form-data; name="' + k.encode("utf-8", "surrogatepass") + b'"'
        if extra == b"FILE":
            disposition += b'; filename="a.txt"'
            extra = b""
        value = v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass")
        head = b"--" + used + b"\r\nContent-Disposition: " + disposition + b"\r\n" + extra
        parts.append(head + b"\r\n" + value + b"\r\n")
    content = b"".join(parts) + body.junk
    if not body.truncated:
        content += b"--" + used + b"--\r\n"
    ctype = b"multipart/form-data"
    if body.boundary is not None:
        ctype += b"; boundary=" + boundary
    if body.charset is not None:
        ctype += b"; charset=" + body.charset.encode()
    return content, ctype


# ----- the target: the app on one database, and the checks --------------------------------


@dataclass
class Target:
    runner: asyncio.Runner
    api: Api
    app: Any
    seeded: Seeded
    before: dict[str, Any]
    seen: Counter[tuple[str, int]] = field(default_factory=Counter)
    addresses: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def path(self, case: Case, refused: bool) -> bytes:
        """The raw path; the guarded conversation only where the request is certainly refused
        (elsewhere its id is the playground's: a valid request may change that one)."""
        ids = self.seeded.ids()
        segments = []
        for segment in case.path:
            if segment.startswith("{id:"):
                kind, spelling = segment[4:-1].split(":")
                if kind == "guarded" and not refused:
                    kind = "playground"
                value = ids[kind]
                value = {
                    "": value,
                    "upper": value.upper(),
                    "hex": value.replace("-", ""),
                    "braces": "%7B" + value + "%7D",
                    "urn": "urn:uuid:" + value,
                }[spelling]
                segments.append(value)
            else:
                segments.append(segment)
        return ("/console/" + "/".join(segments)).encode("ascii")

    def send(self, case: Case, refused: bool) -> Reply:
        """Resolve the case's placeholders (a new session for each request) and make it."""
        sealer = self.api.state.sealer
        session = cs.seal_session(sealer, hash_token(self.seeded.secrets[TOKEN]))
        nonce = next((v for n, v in case.cookies if n == cs.LOGIN_COOKIE), "absent")
        values = {**self.seeded.secrets, SESSION: session, SESSION_NAME: case.session_name()}
        # {csrf}: the token of the first cookie under the session's name (the minted session,
        # or the stale cookie the case sends instead), as the page that cookie got would hold
        names = {SESSION_NAME, case.session_name()}
        bound = next((values.get(v, v) for n, v in case.cookies if n in names), session)
        valid_csrf = cs.csrf_token(SECRET, bound)
        values |= {
            CSRF: valid_csrf,
            LOGIN_CSRF: cs.csrf_token(SECRET, f"login:{nonce}"),
            "{csrf:truncated}": valid_csrf[:-2] + ("xx" if not valid_csrf.endswith("xx") else "yy"),
        }

        def text(value: str) -> str:
            return values.get(value, value)

        def resolve(value: str | bytes) -> str | bytes:
            return text(value) if isinstance(value, str) else value

        raw_headers: list[tuple[bytes, bytes]] = []
        if not case.header_values("host"):
            raw_headers.append((b"host", HOST.encode()))
        if case.cookies:
            cookie = "; ".join(f"{text(n)}={text(v)}" for n, v in case.cookies)
            raw_headers.append((b"cookie", cookie.encode("latin-1")))
        for name, value in case.headers:
            raw_headers.append((name.encode(), text(value).encode("latin-1")))
        content = b""
        if case.body is not None:
            content, ctype = encode(case.body, resolve)
            if ctype is not None:
                raw_headers.append((b"content-type", ctype))
            raw_headers.append((b"content-length", str(len(content)).encode()))
        client = case.client
        if client == UNIQUE_ADDRESS:  # (one the sign-in limit has not seen: it admits it)
            n = next(self.addresses)
            client = (f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 40000)
        coro = call(
            self.app,
            case.method,
            case.scheme,
            self.path(case, refused),
            case.query,
            raw_headers,
            content,
            client,
        )
        return self.runner.run(coro)

    def check(self, case: Case, *, refused: bool = False, shows_data: bool = True) -> Reply:
        """Make the request and check its response: ``refused``: it must be (no 2xx or 3xx,
        nothing of a conversation shown); ``shows_data``: a conversation may be shown."""
        note(f"case: {case}")
        reply = self.send(case, refused)
        self.seen[(case.route, reply.status)] += 1
        where = f"{case.method} {case.route} -> {reply.status}"
        note(f"reply: {reply.status} {reply.headers} {reply.body[:300]!r}")
        assert reply.status < 500, f"{where}: a server error\n{reply.body[:2000]!r}"
        for name, value in reply.headers:
            assert "\r" not in value, (where, name)
            assert "\n" not in value, (where, name)
        if refused:
            signing_in = case.method == "GET" and self.to_sign_in(reply)
            assert not 200 <= reply.status < 400 or signing_in, f"{where}: not refused"
        if 300 <= reply.status < 400:
            assert_safe_location(reply.header("location"), case.scheme, where)
            assert_security_headers(reply, where)
            assert not reply.body.strip() or reply.media_type == "text/html", where
        elif reply.status == 204:
            assert reply.body == b"", where
            read = case.method == "POST" and case.path[-1:] == ("read",)
            assert read or case.method == "OPTIONS", f"{where}: an empty 2xx"
        elif case.route == "static" and reply.status == 200:
            assert reply.media_type in STATIC_TYPES, (where, reply.media_type)
            assert reply.header("x-content-type-options") == "nosniff", where
        else:
            self.check_page(case, reply, where, shows_data=shows_data and not refused)
        return reply

    @staticmethod
    def check_page(case: Case, reply: Reply, where: str, *, shows_data: bool) -> None:
        """An HTML page (or fragment) of the console, with its headers, inert."""
        assert reply.media_type == "text/html", f"{where}: {reply.media_type!r}"
        assert_security_headers(reply, where)
        page = reply.body.decode("utf-8")  # strictly: the page says it is UTF-8
        assert_inert(page, where)
        assert FOREIGN_TEXT not in page, f"{where}: another app's conversation shown"
        if not shows_data:
            for text in (PLAYGROUND_TEXT, GUARDED_TEXT):
                assert text not in page, f"{where}: a conversation shown"
        if not case.has_session:
            assert "Ada &lt;Lovelace&gt;" not in page, f"{where}: the agent's page"

    @staticmethod
    def to_sign_in(reply: Reply) -> bool:
        location = reply.header("location") or ""
        return reply.status in {302, 303, 307} and urlsplit(location).path == "/console/login"

    def assert_unchanged(self) -> None:
        after = self.runner.run(snapshot(self.api, self.seeded))
        for name, value in self.before.items():
            assert after[name] == value, f"{name} changed"

    def assert_reached(self, *wanted: tuple[str, int]) -> None:
        missing = [w for w in wanted if not self.seen[w]]
        tally = sorted(self.seen.items())
        assert not missing, f"never answered: {missing}; answers: {tally}"


def assert_safe_location(location: str | None, scheme: str, where: str) -> None:
    """Where a browser goes: this origin, a path under /console once dot segments and
    percent-encoded dots are resolved; and the same for a ``next`` it carries."""
    assert location, f"{where}: a redirect without a Location"
    assert not any(ord(c) < 0x21 or c in "\\\x7f" for c in location), (where, location)
    origin = f"{scheme}://{HOST}"
    parts = urlsplit(urljoin(f"{origin}/console/x", location))
    assert f"{parts.scheme}://{parts.netloc}" == origin, (where, location)
    assert_console_path(parts.path, where)
    for key, value in parse_qsl(parts.query):
        if key == "next":
            assert value.startswith("/"), (where, location)
            assert not value.startswith("//"), (where, location)
            assert_console_path(urlsplit(urljoin(f"{origin}/", value)).path, where)


def assert_console_path(path: str, where: str) -> None:
    decoded = path
    for _ in range(4):
        decoded = unquote(decoded)
    normal = posixpath.normpath(decoded)
    assert normal == "/console" or normal.startswith("/console/"), (where, path)


def assert_security_headers(reply: Reply, where: str) -> None:
    csp = reply.header("content-security-policy") or ""
    assert "frame-ancestors 'none'" in csp, (where, csp)
    assert "script-src 'self'" in csp, (where, csp)
    assert "'unsafe-inline'" not in csp, (where, csp)
    assert reply.header("x-frame-options") == "DENY", where
    assert reply.header("x-content-type-options") == "nosniff", where
    assert reply.header("cache-control") == "no-store", where
    assert reply.header("referrer-policy") == "no-referrer", where


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def assert_inert(page: str, where: str) -> None:
    """No markup but the templates': one script (the console's file), no event handler,
    no link to a scheme or origin that is not the page's, no injected tag."""
    assert page.lower().count("<script") <= 1, where
    for raw in PAYLOADS:
        if raw != JS_URL:  # (shown as text, never as a link: the attributes are checked)
            assert raw not in page, (where, raw)
    parser = Tags()
    parser.feed(page)
    parser.close()
    for tag, attrs in parser.tags:
        assert tag not in {"svg", "iframe", "object", "embed", "base", "math", "frame"}, where
        if tag == "script":
            assert attrs == CONSOLE_SCRIPT, (where, attrs)
        if tag == "meta":
            assert ("http-equiv", "refresh") not in attrs, where
        for name, value in attrs:
            assert not name.startswith("on"), (where, tag, name)
            if name in URL_ATTRIBUTES:
                v = (value or "").strip()
                assert v.startswith(("/", "http://", "https://", "#")), (where, tag, name, v)
                assert not v.startswith("//"), (where, tag, name, v)
                assert "\\" not in v, (where, tag, name, v)
                if v.startswith("/"):
                    assert_console_path(urlsplit(v).path, f"{where} {tag} {name}")
                elif v.startswith("http"):
                    netloc = urlsplit(v).netloc
                    assert netloc in {HOST, "www.openstreetmap.org"}, (where, tag, name, v)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """The app on each database (PostgreSQL refuses what SQLite stores: NUL, for one),
    seeded once; the requests of all the tests below go to it."""
    tmp: Path = tmp_path_factory.mktemp("console-fuzz")
    with (
        fresh_database(request, request.param, tmp) as url,
        asyncio.Runner() as runner,
        contextlib.ExitStack() as cleanup,
    ):
        config = make_settings(url, tmp / "data", port=8080)
        stack = contextlib.AsyncExitStack()
        cleanup.callback(lambda: runner.run(stack.aclose()))
        served = serve_app(config, build_registry(), base_url=BASE)
        api = runner.run(stack.enter_async_context(served))
        seeded = runner.run(seed(api))
        before = runner.run(snapshot(api, seeded))
        app = api.http._transport.app  # type: ignore[attr-defined]
        yield Target(runner, api, app, seeded, before)


# ----- the fuzz ---------------------------------------------------------------------------

FILTER_KEYS = ["app", "status", "tag", "q", "mine", "cursor", "next", "limit"]


PAGE_ROUTES = ["inbox", "rows", "conversation", "live", "login", "static"]


def page_cases(s: Seeded, route: str) -> st.SearchStrategy[Case]:
    def filter_value(key: str) -> st.SearchStrategy[str]:
        known: dict[str, st.SearchStrategy[str]] = {
            "app": st.sampled_from(
                [
                    s.app_id,
                    s.other_app_id,
                    s.agent_id,
                    s.app_id.upper(),
                    f" {s.app_id} ",
                    s.app_id.replace("-", ""),
                ]
            ),
            "status": st.sampled_from(["open", "pending", "solved", "closed", "Open", "all"]),
            "tag": st.sampled_from(["keep", "theirs", SVG.lower(), "%", "_", "\\"]),
            "q": st.sampled_from(["Guarded", "Foreign", "secret", "%", "_", "\\", "*", "'", '"']),
            "mine": st.sampled_from(["1", "0", "true", "11"]),
            "cursor": cursors(s),
            "next": st.sampled_from(NEXT_TARGETS),
        }
        if key in known:
            return weighted((1, known[key]), (1, hostile_text()))
        return hostile_text()

    conversation_id = path_id(["playground"] * 12 + list(s.ids()))
    static_name = weighted(
        (2, st.sampled_from(["console.js", "console.css", "favicon.svg"])),
        (
            1,
            hostile_text(
                ["..%2F..%2Fasgi.py", "console.js%00", "CONSOLE.JS", "console.js.map"]
            ).map(lambda v: pct(v).decode()),
        ),
    )
    paths: dict[str, st.SearchStrategy[tuple[str, ...]]] = {
        "inbox": st.sampled_from([(), ("",)]),
        "rows": st.just(("inbox", "rows")),
        "conversation": st.tuples(st.just("c"), conversation_id),
        "live": st.tuples(st.just("c"), conversation_id, st.just("live")),
        "login": st.just(("login",)),
        "static": st.tuples(st.just("static"), static_name),
    }
    return st.builds(
        lambda path, q, cookie, hdrs, scheme: Case(
            route=route,
            method="GET",
            path=path,
            query=q,
            cookies=cookie,
            headers=hdrs,
            scheme=scheme,
        ),
        paths[route],
        query_strings(PAGE_KEYS[route], filter_value),
        cookies(),
        headers(csrf_header=False),
        st.sampled_from(["http"] * 4 + ["https"]),
    )


PAGE_REACHES = {
    "inbox": [200, 303],
    "rows": [200, 303],
    "conversation": [200, 303, 404],
    "live": [200, 404],
    "login": [200],
    "static": [200, 404],
}
PAGE_KEYS = {
    "inbox": FILTER_KEYS,
    "rows": FILTER_KEYS,
    "conversation": ["cursor", "next", "status"],
    "live": ["cursor", "next", "status"],
    "login": ["next"],
    "static": ["v", "next"],
}


@pytest.mark.parametrize("route", PAGE_ROUTES)
def test_pages(target: Target, route: str) -> None:
    """GET each page and fragment with hostile query strings, path ids, cookies, headers."""
    target.seen.clear()
    guarded_route = route in {"inbox", "rows", "conversation", "live"}

    @fuzz(100)
    @given(case=page_cases(target.seeded, route))
    def run(case: Case) -> None:
        refused = guarded_route and not case.has_session
        reply = target.check(case, refused=refused, shows_data=guarded_route)
        if case.route == "login" and reply.status == 200:
            assert_login_page_targets(reply.body.decode(), case)
        foreign = any(seg.startswith("{id:foreign") for seg in case.path)
        if foreign and case.route in {"conversation", "live"}:
            assert reply.status != 200, "another app's conversation"

    run()
    target.assert_unchanged()
    target.assert_reached(*[(route, status) for status in PAGE_REACHES[route]])


def assert_login_page_targets(page: str, case: Case) -> None:
    """The sign-in page's ``next`` (posted back) and same-origin retry stay on the console."""
    parser = Tags()
    parser.feed(page)
    for tag, attrs in parser.tags:
        a = dict(attrs)
        if tag == "input" and a.get("name") == "next":
            assert_console_path(urlsplit(a.get("value") or "").path, "login next")
            assert (a.get("value") or "").startswith("/console"), a
        if tag == "body" and "data-retry" in a:
            assert "cross-site" in case.header_values("sec-fetch-site"), a


FORM_ROUTES = {
    "reply": ("reply", ["body", "internal"]),
    "update": (
        "update",
        ["status", "status_was", "priority", "priority_was", "tags", "tags_was", "assignee"],
    ),
    "read": ("read", ["up_to_message_id"]),
    "logout": ("", ["next"]),
}


def form_cases(s: Seeded, route: str) -> st.SearchStrategy[Case]:
    def field_value(name: str) -> st.SearchStrategy[str]:
        known: dict[str, st.SearchStrategy[str]] = {
            "body": st.sampled_from(
                ["Thanks, on it"] * 4 + ["a\x00b", "   ", "\u00e9" * 10_000, "x" * 10_001]
            ),
            "internal": st.sampled_from(["1", "1", "0", "on", "true", ""]),
            "status": st.sampled_from(
                ["open", "pending", "solved", "closed"] * 2 + ["Closed", "x"]
            ),
            "priority": st.sampled_from(["low", "normal", "high", "urgent"] * 2 + ["critical"]),
            "tags": st.sampled_from(
                [
                    "a, b",
                    "billing",
                    ",,,",
                    ",".join(f"t{i}" for i in range(30)),
                    "x" * 60,
                    " , x , ",
                ]
            ),
            "assignee": st.sampled_from(
                [
                    "me",
                    "none",
                    "keep",
                    f"agent:{s.grace_id}",
                    f"agent:{s.eve_id}",
                    f"agent:{s.gone_id}",
                    f"agent:{s.agent_id}",
                    f"agent:{s.playground}",
                    "agent:",
                    "agent:not-a-uuid",
                    "agent:" + s.grace_id.upper(),
                    "Agent:me",
                ]
            ),
            "up_to_message_id": st.just(s.message_id),
        }
        if name.endswith("_was"):
            return known[name.removesuffix("_was")] | hostile_text()
        if name in known:
            return weighted((3, known[name]), (1, hostile_text()))
        return hostile_text()

    action, names = FORM_ROUTES[route]
    if route == "logout":
        path: st.SearchStrategy[tuple[str, ...]] = st.just(("logout",))
    else:
        kinds = ["playground"] * 24 + list(s.ids())
        path = st.tuples(st.just("c"), path_id(kinds), st.just(action))
    return st.builds(
        lambda p, body, cookie, hdrs, scheme, query: Case(
            route=route,
            method="POST",
            path=p,
            body=body,
            cookies=cookie,
            headers=hdrs,
            scheme=scheme,
            query=query,
        ),
        path,
        bodies([*names, "_csrf", "token", "next"], field_value, [CSRF, *BAD_CSRF], names),
        cookies(),
        headers(csrf_header=True),
        weighted((4, st.just("http")), (1, st.just("https"))),
        weighted(
            (4, st.just(b"")), (1, query_strings(["next", "_csrf"], lambda _: hostile_text()))
        ),
    )


FORM_REACHES = {
    "reply": [303, 403, 404, 422],
    "update": [303, 403, 404, 422],
    "read": [204, 403, 404],
    "logout": [303, 401, 403],
}


@pytest.mark.parametrize("route", sorted(FORM_ROUTES))
def test_forms(target: Target, route: str) -> None:
    """POST each form (reply and note, the controls, mark read, sign out) with hostile
    bodies, CSRF tokens, cookies and ids; refused ones change nothing."""
    target.seen.clear()

    @fuzz(150)
    @given(case=form_cases(target.seeded, route))
    def run(case: Case) -> None:
        refused = not case.has_session or not case.mentions(CSRF) or case.cross_site
        reply = target.check(case, refused=refused)
        if any(seg.startswith("{id:foreign") for seg in case.path):
            assert not 200 <= reply.status < 400, "another app's conversation"
        if case.route == "logout" and 300 <= reply.status < 400:
            assert reply.header("location") == "/console/login", reply.headers

    run()
    target.assert_unchanged()
    target.assert_reached(*[(route, status) for status in FORM_REACHES[route]])


def login_cases() -> st.SearchStrategy[Case]:
    def field_value(name: str) -> st.SearchStrategy[str]:
        if name == "token":
            return weighted(
                (4, st.sampled_from([TOKEN, TOKEN_PADDED, TOKEN_OTHER_APP])),
                (2, st.sampled_from(BAD_TOKENS)),
                (1, hostile_text(["tbg_", "tbg_" + "x" * 43, "tbg_" + "x" * 300, "tba_x"])),
            )
        if name == "next":
            return weighted((3, st.sampled_from(NEXT_TARGETS)), (1, hostile_text()))
        return hostile_text()

    addresses = st.tuples(
        st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).map(str), st.integers(1, 65535)
    )  # (repeated: the sign-in limit answers 429)
    return st.builds(
        lambda body, cookie, hdrs, client, query: Case(
            route="login",
            method="POST",
            path=("login",),
            body=body,
            cookies=cookie,
            headers=hdrs,
            client=client,
            query=query,
        ),
        bodies(
            ["token", "next"], field_value, [LOGIN_CSRF, CSRF, "{csrf:other}"], ["token", "next"]
        ),
        cookies(login=True),
        headers(csrf_header=False),
        st.sampled_from([UNIQUE_ADDRESS] * 6 + [None, ("127.0.0.1", 50000)]) | addresses,
        weighted(
            (4, st.just(b"")), (1, query_strings(["next"], lambda _: st.sampled_from(NEXT_TARGETS)))
        ),
    )


def test_sign_in(target: Target) -> None:
    """POST the sign-in form: tokens, ``next`` targets, the login CSRF token, addresses."""
    target.seen.clear()

    @fuzz(200)
    @given(case=login_cases())
    def run(case: Case) -> None:
        reply = target.check(case, shows_data=False)
        token = [v for k, v in (case.body.fields if case.body else ()) if k == "token"]
        may_sign_in = (
            any(t in SIGNS_IN for t in token) and case.mentions(LOGIN_CSRF) and not case.cross_site
        )
        cookies = [c for c in reply.headers if c[0] == "set-cookie"]
        sessions = [
            v
            for _, v in cookies
            if v.split("=", 1)[0] in {cs.COOKIE, cs.SECURE_COOKIE} and "max-age=0" not in v.lower()
        ]
        if reply.status == 303:
            assert may_sign_in, "signed in without an agent's token and the form's CSRF token"
            assert len(sessions) == 1, cookies
        else:
            assert not sessions, f"{reply.status} with a session cookie"

    run()
    target.assert_unchanged()
    target.assert_reached(("login", 303), ("login", 401), ("login", 403))


def any_cases(s: Seeded) -> st.SearchStrategy[Case]:
    names = """c inbox rows login logout static reply update read live .. . %2e%2e %2E %2F %5C
        %00 %zz % %ff ; console.js %ED%A0%80 %C0%AE%C0%AE ~ *"""
    segment = st.one_of(
        st.sampled_from(["", "x" * 3000, *names.split()]),
        path_id(list(s.ids())),
        hostile_text().map(lambda v: pct(v).decode()),
    )
    verbs = "GET POST PUT PATCH DELETE HEAD OPTIONS TRACE CONNECT get PROPFIND"
    methods = st.sampled_from([*verbs.split(), "X" * 100])
    form = bodies(["_csrf", "body", "status", "token"], lambda _: hostile_text(), [CSRF, *BAD_CSRF])
    return st.builds(
        lambda method, path, q, cookie, hdrs, body: Case(
            route="any",
            method=method,
            path=tuple(path),
            query=q,
            cookies=cookie,
            headers=hdrs,
            body=body if method not in {"GET", "HEAD"} else None,
        ),
        methods,
        st.lists(segment, min_size=1, max_size=4),
        query_strings(FILTER_KEYS, lambda _: hostile_text()),
        cookies(),
        headers(csrf_header=True),
        st.none() | form,
    )


def test_any_method_any_path(target: Target) -> None:
    """Any method on any path under /console: the router's 404 and 405 are console pages."""
    s = target.seeded
    target.seen.clear()

    @fuzz(150)
    @given(case=any_cases(s))
    def run(case: Case) -> None:
        # a write needs a session and the token; a read of a page shows data only signed in
        refused = case.method != "GET" and (
            not case.has_session or not case.mentions(CSRF) or case.cross_site
        )
        target.check(case, refused=refused and case.method not in {"OPTIONS", "HEAD"})

    run()
    target.assert_unchanged()
    target.assert_reached(("any", 404), ("any", 405))


# ----- bugs the fuzz found, kept as regression tests ---------------------------------------


async def test_a_csrf_token_that_is_not_ascii_is_a_403(api: Api, console: Console) -> None:
    w = await world(api)
    cid = (await api.feedback(w.user, GUARDED_TEXT))["id"]
    # signed out: the sign-in form (anyone can get the login cookie it is bound to)
    assert (await console.http.get("/console/login")).status_code == 200
    r = await console.http.post("/console/login", data={"token": w.agent_token, "_csrf": "é"})
    assert r.status_code == 403, r.status_code
    # signed in: the form field and the header of every other POST
    assert (await console.sign_in(w.agent_token)).status_code == 303
    for path in [
        f"/console/c/{cid}/reply",
        f"/console/c/{cid}/update",
        f"/console/c/{cid}/read",
        "/console/logout",
    ]:
        r = await console.http.post(path, data={"_csrf": "é", "body": "x", "status": "closed"})
        assert r.status_code == 403, (path, r.status_code)
        r = await console.http.post(path, headers={b"X-CSRF-Token": "é".encode()})
        assert r.status_code == 403, (path, r.status_code)


async def test_a_form_field_with_a_lone_surrogate_is_a_400(api: Api, console: Console) -> None:
    w = await world(api)
    cid = (await api.feedback(w.user, GUARDED_TEXT))["id"]
    assert (await console.sign_in(w.agent_token)).status_code == 303
    utf7 = b"Content-Type: text/plain; charset=utf-7\r\n"
    for path, name in [("reply", "body"), ("update", "tags"), ("update", "status")]:
        body, headers = multipart(("_csrf", b"", console.csrf.encode()), (name, utf7, b"+2AA-"))
        r = await console.http.post(f"/console/c/{cid}/{path}", content=body, headers=headers)
        assert r.status_code in {400, 422}, (path, name, r.status_code)
    detail = (await api.http.get(f"/v1/agent/conversations/{cid}", headers=w.agent)).json()
    assert [m["body"] for m in detail["messages"]] == [GUARDED_TEXT]
    assert (detail["status"], detail["tags"]) == ("open", [])


async def test_a_host_header_with_a_bad_port(api: Api, console: Console) -> None:
    w = await world(api)
    assert (await console.sign_in(w.agent_token)).status_code == 303
    for host in ["127.0.0.1:99999", "127.0.0.1:abc"]:
        for path, status in [("/console/login", 200), ("/console/", 200), ("/console/nope", 404)]:
            r = await console.http.get(path, headers={"Host": host})
            assert r.status_code == status, (host, path, r.status_code)
