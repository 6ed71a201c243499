"""Operations: health, readiness, metrics, OpenAPI, rate limits, database outages, and
pagination that stays stable while rows are being inserted."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import re
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import select, text, update
from structlog.testing import capture_logs

from tellback_server import cli
from tellback_server.asgi import build_state, create_app, stopped
from tellback_server.cli import GC_YOUNG_THRESHOLD, freeze_startup_heap
from tellback_server.db import engine
from tellback_server.db.engine import Database
from tellback_server.db.models import Job
from tellback_server.jobs.queue import enqueue
from tellback_server.jobs.registry import JobRegistry
from tellback_server.ratelimit import RateLimiter
from tellback_server.security import (
    ADMIN_TOKEN_PREFIX,
    AGENT_TOKEN_PREFIX,
    SESSION_TOKEN_PREFIX,
    new_token,
)
from tellback_server.settings import S3Settings, SettingsError, load_settings
from tests.conftest import S3_ACCESS_KEY, _admin_exec
from tests.server.conftest import (
    Api,
    AppInfo,
    _admin_token,
    lifespan,
    make_settings,
    s3_settings,
    serve_app,
)
from tests.server.test_storage_s3 import stalled_endpoint

PROBLEM_JSON = "application/problem+json"
UNLIMITED: dict[str, int] = {"app_per_minute": 0, "user_per_minute": 0}


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers.get("content-type", "").split(";")[0].strip() == PROBLEM_JSON
    body = r.json()
    assert isinstance(body, dict)
    for member in ("type", "title", "status", "code", "detail"):
        assert member in body, f"problem lacks {member!r}: {body}"
    assert body["status"] == status
    assert body["code"] == code, body
    assert isinstance(body["detail"], str)
    assert body["detail"]
    rid = r.headers.get("x-request-id")
    assert rid, "every response carries X-Request-Id"
    assert body.get("request_id") == rid
    return body


def retry_after(r: httpx.Response) -> int:
    raw = r.headers.get("retry-after")
    assert raw is not None, "Retry-After is required here"
    assert re.fullmatch(r"\d+", raw.strip()), f"Retry-After must be delay-seconds, got {raw!r}"
    seconds = int(raw)
    assert seconds >= 1
    return seconds


# ----- health, readiness, metrics ---------------------------------------------------------------


async def test_healthz(api: Api) -> None:
    r = await api.http.get("/healthz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok"}
    assert r.headers.get("x-request-id")


async def test_readyz(api: Api) -> None:
    r = await api.http.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"status": "ready"}


async def test_readyz_tells_wrong_storage_credentials_from_storage_down(
    s3_endpoint: str, sqlite_template: Path, tmp_path: Path
) -> None:
    """Wrong S3 credentials were reported as "object storage unreachable", which sent an
    operator looking at the network. The reason is S3's error code; no key is shown."""
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    wrong = S3Settings(
        endpoint=s3_endpoint,
        access_key=S3_ACCESS_KEY,
        secret_key="not-the-secret-key-at-all",
        bucket=f"tb-{uuid.uuid4().hex[:12]}",
        secure=False,
        region="us-east-1",
    )
    settings = make_settings(f"sqlite+aiosqlite:///{db}", tmp_path / "data", s3=wrong)
    async with serve_app(settings, JobRegistry()) as api:
        r = await api.http.get("/readyz")
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "storage_unavailable"
    assert r.json()["detail"] in {  # (S3 and MinIO say the first, SeaweedFS the second)
        "object storage error: SignatureDoesNotMatch",
        "object storage error: AccessDenied",
    }
    assert "not-the-secret-key-at-all" not in r.text


async def test_a_stalled_storage_is_not_ready_within_seconds(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """minio's client waited 60 s for an answer, three times: /readyz and a new upload
    answered after three minutes, long past any probe's patience. Readiness answers
    within 3 s, and an upload (which pings storage first) 503 as fast."""
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    with stalled_endpoint() as endpoint:
        settings = make_settings(
            f"sqlite+aiosqlite:///{db}", tmp_path / "data", s3=s3_settings(endpoint)
        )
        state = build_state(settings)  # (no lifespan: its bucket check would wait too)
        app = create_app(settings, state=state)
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t.test") as http:
            api = Api(http=http, state=state, admin_token=await _admin_token(state))
            user = await api.user_headers(await api.create_app())
            started = time.monotonic()
            r = await asyncio.wait_for(http.get("/readyz"), 20)
            assert time.monotonic() - started < 5
            detail = assert_problem(r, 503, "storage_unavailable")["detail"]
            assert detail.startswith(f"object storage unavailable: cannot reach {endpoint}: ")
            started = time.monotonic()
            body = {"filename": "a.png", "content_type": "image/png", "size": 10, "kind": "photo"}
            r = await asyncio.wait_for(http.post("/v1/client/uploads", json=body, headers=user), 20)
            assert time.monotonic() - started < 5
            assert_problem(r, 503, "storage_unavailable")
        await state.db.dispose()


def _request_counts(text: str) -> dict[tuple[str, str, str], float]:
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tellback_http_requests_total":
                key = (sample.labels["method"], sample.labels["route"], sample.labels["status"])
                counts[key] = sample.value
    return counts


async def test_metrics_is_prometheus_text_counting_requests(api: Api) -> None:
    app = await api.create_app(rate_limits=UNLIMITED)
    user = await api.user_headers(app)
    conv = await api.feedback(user)
    r = await api.http.get(f"/v1/client/conversations/{conv['id']}", headers=user)
    assert r.status_code == 200
    assert (await api.http.get("/healthz")).status_code == 200

    r = await api.http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE tellback_http_requests_total counter" in r.text
    assert "tellback_http_request_duration_seconds_bucket" in r.text
    counts = _request_counts(r.text)
    assert counts[("GET", "/healthz", "200")] == 1
    assert counts[("POST", "/v1/client/conversations", "201")] == 1
    # Routes are templates, not concrete paths: ids would explode the label cardinality.
    assert conv["id"] not in r.text
    assert any(
        method == "GET" and route.startswith("/v1/client/conversations/{") and status == "200"
        for method, route, status in counts
    ), counts

    assert (await api.http.get("/healthz")).status_code == 200
    r = await api.http.get("/metrics")
    assert _request_counts(r.text)[("GET", "/healthz", "200")] == 2


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


async def test_metrics_report_the_job_backlog_of_every_worker(api: Api) -> None:
    """The queue as the database holds it, so an API process reports it while the
    workers run elsewhere (`tellback_jobs_queued` was declared, never set): jobs
    queued by kind, and how long the longest-waiting due one has waited."""
    now = dt.datetime.now(dt.UTC)
    async with api.state.db.session(write=True) as db:
        for kind, due in (
            ("push.send", now - dt.timedelta(minutes=10)),
            ("push.send", now),
            ("storage.delete", now + dt.timedelta(hours=1)),  # scheduled for later
        ):
            await enqueue(db, kind, {}, run_after=due)
    text = (await api.http.get("/metrics")).text
    queued = _samples(text, "tellback_jobs_queued")
    assert queued == {(("kind", "push.send"),): 2, (("kind", "storage.delete"),): 1}
    (oldest,) = _samples(text, "tellback_jobs_oldest_due_seconds").values()
    assert 600 <= oldest < 900
    async with api.state.db.session(write=True) as db:
        await db.execute(update(Job).values(status="done"))
    text = (await api.http.get("/metrics")).text
    assert _samples(text, "tellback_jobs_queued") == {}
    assert _samples(text, "tellback_jobs_oldest_due_seconds") == {(): 0}


async def test_a_scrape_answers_while_the_job_table_cannot(api: Api, database_url: str) -> None:
    """The backlog query gives up after a bound, keeping the last figures, so a scrape
    answers (and frees its connection) while the database cannot: here a migration's
    lock on `jobs`, which PostgreSQL makes every reader wait for."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite readers never wait for a writer (WAL)")
    async with api.state.db.session(write=True) as db:
        await enqueue(db, "push.send", {})
    scraped = (await api.http.get("/metrics")).text
    before = _samples(scraped, "tellback_jobs_queued")
    assert before == {(("kind", "push.send"),): 1}
    (read_at,) = _samples(scraped, "tellback_jobs_backlog_read_timestamp_seconds").values()
    assert abs(read_at - time.time()) < 60
    async with api.state.db.session(write=True) as db:
        await db.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
        # Unbounded, the scrape would wait for the lock as long as it is held.
        r = await asyncio.wait_for(api.http.get("/metrics"), timeout=30)
    assert r.status_code == 200, r.text
    assert _samples(r.text, "tellback_jobs_queued") == before
    # The figures kept say how old they are.
    assert _samples(r.text, "tellback_jobs_backlog_read_timestamp_seconds") == {(): read_at}
    assert (await api.http.get("/readyz")).status_code == 200


def _commit_sizes(text: str) -> dict[str, tuple[float, float]]:
    """``tellback_db_commit_size`` by kind: (commits, requests they carried)."""
    seen: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("tellback_db_commit_size_"):
                suffix = sample.name.removeprefix("tellback_db_commit_size_")
                seen.setdefault(sample.labels["kind"], {})[suffix] = sample.value
    return {kind: (v["count"], v["sum"]) for kind, v in seen.items()}


async def test_metrics_count_the_requests_each_commit_carried(api: Api, database_url: str) -> None:
    """Group commit as operators see it: how many requests each commit carried. On
    SQLite every write request goes in a write group; on PostgreSQL new feedback goes
    in statements of several (db/batch.py), each feedback in exactly one."""
    app = await api.create_app(rate_limits=UNLIMITED)
    users = [await api.user_headers(app) for _ in range(4)]
    kind = "sqlite_write_group" if database_url.startswith("sqlite") else "postgresql_new_feedback"
    before = _commit_sizes((await api.http.get("/metrics")).text).get(kind, (0.0, 0.0))

    async def send(i: int) -> int:
        body = {"body": f"feedback {i}"}
        r = await api.http.post("/v1/client/conversations", json=body, headers=users[i % 4])
        return r.status_code

    assert set(await asyncio.gather(*(send(i) for i in range(24)))) == {201}
    text = (await api.http.get("/metrics")).text
    assert "# TYPE tellback_db_commit_size histogram" in text
    commits, carried = (a - b for a, b in zip(_commit_sizes(text)[kind], before, strict=True))
    assert commits >= 1
    if kind == "postgresql_new_feedback":
        assert carried == 24
        assert commits < carried  # some statements carried several
    else:  # (the in-process worker's writes go in groups too)
        assert carried >= 24


# ----- OpenAPI ----------------------------------------------------------------------------------

# Endpoints of API.md that the controllers implement today.
REQUIRED_OPERATIONS = {
    ("post", "/v1/client/sessions"),
    ("patch", "/v1/client/me"),
    ("get", "/v1/client/config"),
    ("post", "/v1/client/conversations"),
    ("get", "/v1/client/conversations"),
    ("get", "/v1/client/conversations/{conversation_id}"),
    ("get", "/v1/client/conversations/{conversation_id}/messages"),
    ("post", "/v1/client/conversations/{conversation_id}/messages"),
    ("post", "/v1/client/conversations/{conversation_id}/read"),
    ("get", "/v1/client/unread"),
    ("get", "/v1/agent/conversations"),
    ("get", "/v1/agent/conversations/{conversation_id}"),
    ("post", "/v1/agent/conversations/{conversation_id}/messages"),
    ("patch", "/v1/agent/conversations/{conversation_id}"),
    ("post", "/v1/admin/apps"),
    ("get", "/v1/admin/apps"),
    ("get", "/v1/admin/apps/{app_id}"),
    ("patch", "/v1/admin/apps/{app_id}"),
    ("post", "/v1/admin/apps/{app_id}/rotate-keys"),
    ("post", "/v1/admin/agents"),
}
HTTP_METHODS = {"get", "put", "post", "patch", "delete"}


def _openapi_path(route_path: str) -> str:
    """``/x/{id:uuid}`` (Litestar) -> ``/x/{id}`` (OpenAPI)."""
    return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", route_path)


def _controller_operations(app: Litestar) -> set[tuple[str, str]]:
    """(method, path) of every /v1 handler not deliberately hidden from the schema."""
    operations: set[tuple[str, str]] = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or not route.path.startswith("/v1/"):
            continue
        for handler in route.route_handlers:
            if not handler.resolve_include_in_schema():
                continue  # e.g. signed local-storage URLs, which are not called directly
            for method in handler.http_methods:
                if method.lower() in HTTP_METHODS:
                    operations.add((method.lower(), _openapi_path(route.path)))
    return operations


async def test_openapi_31_lists_every_v1_path(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}", tmp_path / "data")
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://tellback.test") as http,
    ):
        r = await http.get("/schema/openapi.json")
        assert r.status_code == 200, r.text
        doc = r.json()
        page = await http.get("/schema")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
    assert str(doc["openapi"]).startswith("3.1"), doc["openapi"]
    assert doc["info"]["title"]
    assert doc["info"]["version"]

    documented = {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    served = _controller_operations(app)
    assert served >= REQUIRED_OPERATIONS, REQUIRED_OPERATIONS - served
    missing = served - documented
    assert not missing, f"served but not in OpenAPI: {sorted(missing)}"
    assert {p for _, p in served} <= set(doc["paths"])
    for path in ("/healthz", "/readyz", "/metrics"):
        assert path in doc["paths"], path
    for method, path in served:
        operation = doc["paths"][path][method]
        assert operation.get("responses"), (method, path)
    # A body that may be left out is documented so (generated clients would force one).
    optional = {
        (method, path)
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS and operation.get("requestBody", {}).get("required") is False
    }
    assert optional == {
        ("post", "/v1/client/uploads/{upload_id}/complete"),
        ("post", "/v1/admin/apps/{app_id}/rotate-keys"),
        ("post", "/v1/admin/apps/{app_id}/webhooks/{webhook_id}/rotate-secret"),
    }
    # The headers clients act on are declared where they are sent (none were).
    assert set(doc["components"]["headers"]) == {
        "X-Request-Id",
        "Retry-After",
        "Idempotent-Replayed",
    }
    replayable = set()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS or not path.startswith("/v1/"):
                continue
            keyed = any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", ()))
            for status, response in operation["responses"].items():
                headers = response.get("headers", {})
                assert "X-Request-Id" in headers, (method, path, status)
                if status in ("409", "429", "503"):
                    assert headers["Retry-After"] == {"$ref": "#/components/headers/Retry-After"}
                if status.startswith("2") and "Idempotent-Replayed" in headers:
                    replayable.add((method, path))
                if not keyed:
                    assert "Idempotent-Replayed" not in headers, (method, path, status)
    assert replayable >= {
        ("post", "/v1/client/conversations"),
        ("post", "/v1/client/conversations/{conversation_id}/messages"),
        ("post", "/v1/client/uploads"),
        ("post", "/v1/agent/conversations/{conversation_id}/messages"),
        ("post", "/v1/admin/apps"),
    }


# ----- rate limits ------------------------------------------------------------------------------


class ShiftedClock:
    """Wraps the app's limiter so a test can move its clock forward."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.offset = 0.0
        self._hit = limiter.hit

    def hit(self, key: str, per_minute: int, now: float | None = None) -> int | None:
        return self._hit(key, per_minute, time.monotonic() + self.offset if now is None else now)


async def _agent_total(api: Api, agent: dict[str, str]) -> int:
    r = await api.http.get("/v1/agent/conversations", params={"limit": 100}, headers=agent)
    assert r.status_code == 200, r.text
    return len(r.json()["items"])


async def test_user_rate_limit(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = ShiftedClock(api.state.limiter)
    monkeypatch.setattr(api.state.limiter, "hit", clock.hit)
    per_minute = 3
    app = await api.create_app(rate_limits={"user_per_minute": per_minute})
    _, agent = await api.create_agent(app)
    installation = uuid.uuid4().hex
    user = await api.user_headers(app, installation_id=installation)

    admitted = 0
    limited: httpx.Response | None = None
    for i in range(per_minute + 5):
        r = await api.http.post("/v1/client/conversations", json={"body": f"n{i}"}, headers=user)
        if r.status_code == 429:
            limited = r
            break
        assert r.status_code == 201, r.text
        admitted += 1
    assert limited is not None, "the user limit never kicked in"
    assert 1 <= admitted <= per_minute
    assert_problem(limited, 429, "rate_limited")
    wait = retry_after(limited)
    assert wait <= 60, "a per-minute limit never asks for more than a minute"
    # The refused request created nothing.
    assert await _agent_total(api, agent) == admitted

    # Still limited, on any endpoint and through a fresh session of the same end user.
    r = await api.http.get("/v1/client/unread", headers=user)
    assert_problem(r, 429, "rate_limited")
    retry_after(r)
    same_user = await api.user_headers(app, installation_id=installation)
    r = await api.http.get("/v1/client/conversations", headers=same_user)
    assert_problem(r, 429, "rate_limited")
    # Before the request is read: a broken body is refused as limited, not as broken.
    r = await api.http.post(
        "/v1/client/conversations",
        content=b'{"body": ',
        headers={**user, "Content-Type": "application/json"},
    )
    assert_problem(r, 429, "rate_limited")

    # Another end user of the same app is not limited.
    other = await api.user_headers(app)
    for _ in range(admitted - 1):
        r = await api.http.get("/v1/client/unread", headers=other)
        assert r.status_code == 200, r.text
    await api.feedback(other)
    assert await _agent_total(api, agent) == admitted + 1

    # Once Retry-After has passed, the user is let through again.
    clock.offset += wait
    r = await api.http.get("/v1/client/unread", headers=user)
    assert r.status_code == 200, r.text


async def test_one_user_flooding_past_their_limit_leaves_the_app_to_the_others(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's bucket was charged before the user's was checked: one session sending
    fast spent the app's whole budget with requests refused anyway, and every other
    user of the app got 429 (the review: 15 of 44 polls of a quiet user refused)."""
    monkeypatch.setattr(api.state.limiter, "hit", StoppedClockHit(api.state.limiter))
    app = await api.create_app(rate_limits={"app_per_minute": 60, "user_per_minute": 6})
    flooder, quiet = await api.user_headers(app), await api.user_headers(app)
    statuses = [
        (await api.http.get("/v1/client/unread", headers=flooder)).status_code for _ in range(40)
    ]
    assert statuses.count(200) < 5, statuses
    assert statuses.count(429) > 35, statuses
    for _ in range(2):  # within the quiet user's own burst
        r = await api.http.get("/v1/client/unread", headers=quiet)
        assert r.status_code == 200, r.text


class StoppedClockHit:
    """The limiter's ``hit`` with time standing still: what a burst admits, exactly."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._hit = limiter.hit

    def __call__(self, key: str, per_minute: int, now: float | None = None) -> int | None:
        return self._hit(key, per_minute, 1000.0)


async def test_app_rate_limit_covers_all_users(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = ShiftedClock(api.state.limiter)
    monkeypatch.setattr(api.state.limiter, "hit", clock.hit)
    app = await api.create_app(rate_limits={"app_per_minute": 6000, "user_per_minute": 1000})
    other_app = await api.create_app(name="Other")
    users = [await api.user_headers(app), await api.user_headers(app)]
    outsider = await api.user_headers(other_app)

    per_minute = 3
    r = await api.http.patch(
        f"/v1/admin/apps/{app.id}",
        json={"settings": {"rate_limits": {"app_per_minute": per_minute, "user_per_minute": 1000}}},
        headers=api.admin,
    )
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["rate_limits"]["app_per_minute"] == per_minute
    # A second on: the sessions above, at 6,000 a minute, left the app's bucket up to
    # 20 ms ahead of now. Within those 20 ms the loop's second request was refused
    # and the last one below admitted (its slot had come free), so the test failed
    # whenever the server answered fast enough.
    clock.offset += 1.0

    admitted = wait = 0
    limited_index: int | None = None
    for i in range(per_minute + 6):
        r = await api.http.get("/v1/client/unread", headers=users[i % 2])
        if r.status_code == 429:
            limited_index = i
            assert_problem(r, 429, "rate_limited")
            wait = retry_after(r)
            assert wait <= 60
            break
        assert r.status_code == 200, r.text
        admitted += 1
    assert limited_index is not None, "the app limit never kicked in"
    assert 1 <= admitted <= per_minute
    # Every user of the app is now limited, including one who has sent little or nothing.
    for headers in users:
        r = await api.http.get("/v1/client/unread", headers=headers)
        assert_problem(r, 429, "rate_limited")
    r = await api.http.post(
        "/v1/client/sessions",
        json={"app_key": app.app_key, "installation_id": uuid.uuid4().hex},
    )
    assert_problem(r, 429, "rate_limited")
    retry_after(r)
    # Other apps are not affected.
    r = await api.http.get("/v1/client/unread", headers=outsider)
    assert r.status_code == 200, r.text

    clock.offset += wait
    r = await api.http.get("/v1/client/unread", headers=users[1])
    assert r.status_code == 200, r.text


async def test_default_limits_admit_normal_use(api: Api) -> None:
    """Without rate_limits settings a user can send a handful of requests in a row."""
    app = await api.create_app()
    user = await api.user_headers(app)
    for _ in range(10):
        r = await api.http.get("/v1/client/unread", headers=user)
        assert r.status_code == 200, r.text


# ----- database outage -------------------------------------------------------------------------

LEAKS = ("127.0.0.1", "Connect call failed", "refused", "unable to open", "asyncpg", "sqlite3")


@pytest.mark.parametrize("kind", ["postgres-down", "postgres-socket-gone", "sqlite-unopenable"])
async def test_database_outage_is_503(tmp_path: Path, kind: str) -> None:
    if kind == "postgres-down":
        url = "postgresql+asyncpg://postgres@127.0.0.1:1/none"
    elif kind == "postgres-socket-gone":  # a server on a Unix socket, stopped (FileNotFoundError)
        url = f"postgresql+asyncpg://postgres@/none?host={tmp_path / 'no-socket-here'}"
    else:
        directory = tmp_path / "a-directory-not-a-database"
        directory.mkdir()
        url = f"sqlite+aiosqlite:///{directory}"
    settings = make_settings(url, tmp_path / "data")
    state = build_state(settings)
    app = create_app(settings, state=state)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    admin = {"Authorization": f"Bearer {new_token(ADMIN_TOKEN_PREFIX)}"}
    client = {"Authorization": f"Bearer {new_token(SESSION_TOKEN_PREFIX)}"}
    agent = {"Authorization": f"Bearer {new_token(AGENT_TOKEN_PREFIX)}"}
    requests: list[tuple[str, str, dict[str, str], Any]] = [
        ("POST", "/v1/admin/apps", admin, {"name": "Demo"}),
        ("GET", "/v1/admin/apps", admin, None),
        ("POST", "/v1/client/sessions", {}, {"app_key": "tbk_x", "installation_id": "install-1"}),
        ("GET", "/v1/client/conversations", client, None),
        ("POST", "/v1/client/conversations", client, {"body": "hello"}),
        ("GET", "/v1/agent/conversations", agent, None),
    ]
    # capture_logs: the error logs are expected, and checked below.
    with capture_logs() as logs:
        async with (
            lifespan(app),
            httpx.AsyncClient(transport=transport, base_url="http://tellback.test") as http,
        ):
            for method, path, headers, body in requests:
                r = await http.request(method, path, headers=headers, json=body)
                assert_problem(r, 503, "service_unavailable")
                retry_after(r)
                for leak in LEAKS:
                    assert leak not in r.text, (path, r.text)
            r = await http.get("/readyz")
            assert_problem(r, 503, "service_unavailable")
            retry_after(r)
            r = await http.get("/healthz")
            assert r.status_code == 200, "the process itself is up"
    assert any(e.get("log_level") == "error" for e in logs), "outages are logged for operators"
    # One line each with the driver's message, no traceback to render per request.
    outages = [e for e in logs if e["event"] == "db.unavailable"]
    assert outages
    assert all(e["error"] and "exc_info" not in e for e in outages), outages[0]


async def test_a_database_error_never_carries_the_statements_values(
    database_url: str, tmp_path: Path
) -> None:
    """A failed statement's error (logged with its traceback when it answers 500 or
    503) names its SQL, never its values: message bodies, push tokens. Through the ORM
    session and, on SQLite, the inline one the hot paths use."""
    secret = f"tbs_{uuid.uuid4().hex}"
    failing = text("SELECT id FROM no_such_table WHERE token = :token")
    db = Database(make_settings(database_url, tmp_path / "data"))
    try:
        errors: list[Exception] = []
        try:
            async with db.session(write=False) as session:
                await session.execute(failing, {"token": secret})
        except Exception as exc:  # noqa: BLE001 (inspected below)
            errors.append(exc)
        try:
            async with db.transaction(write=False) as tx:
                await tx.run(lambda s: s.execute(failing, {"token": secret}))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    finally:
        await db.dispose()
    assert len(errors) == 2, errors
    for error in errors:
        assert "no_such_table" in str(error)
        assert secret not in str(error)


@pytest.mark.parametrize("idle", ["idle", "just-used"])
async def test_a_pooled_connection_the_server_dropped(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idle: str
) -> None:
    """Idle in the pool, it is pinged at checkout and replaced unseen. Back in the pool a
    moment ago, it is not pinged, but asyncpg saw the server close it (a terminated
    backend says so as it goes), and it is replaced at checkout too. (One that dies
    unseen fails its statement as a lost connection and is replaced then: test_prepared.)"""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has no server to drop connections")
    monkeypatch.setattr(engine, "_PING_AFTER_IDLE_SECONDS", 0.0 if idle == "idle" else 3600.0)
    db = Database(make_settings(database_url, tmp_path / "data"), pool_size=1)

    drivers: list[Any] = []  # the asyncpg connections the pool lent out

    async def backend() -> int:
        async with db.session(write=False) as session:
            raw = await (await session.connection()).get_raw_connection()
            drivers.append(raw.driver_connection)
            return int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)

    try:
        pid = await backend()
        await _admin_exec(database_url, f"SELECT pg_terminate_backend({pid})")
        for _ in range(250):  # terminating returns before the backend has gone
            if drivers[0].is_closed():
                break
            await asyncio.sleep(0.02)
        assert await backend() != pid
    finally:
        await db.dispose()


async def test_the_hot_paths_replace_connections_the_server_dropped(
    database_url: str, tmp_path: Path, registry: JobRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create runs its statements past SQLAlchemy's Connection (prepared statements,
    and on PostgreSQL statements that commit by themselves). When the server drops the
    pool's connections (a restart, a failover) under steady traffic, none is idle long
    enough to be pinged at checkout: each may fail its one request (a 503), and the pool
    must replace it. It kept them, so every request failed for as long as traffic went on."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has no server to drop connections")
    monkeypatch.setattr(engine, "_PING_AFTER_IDLE_SECONDS", 3600.0)  # steady traffic
    settings = replace(make_settings(database_url, tmp_path / "data"), database_pool_size=2)
    async with serve_app(settings, registry) as api:
        app = await api.create_app()
        user = await api.user_headers(app)

        async def create() -> int:
            headers = {**user, "Idempotency-Key": uuid.uuid4().hex}
            r = await api.http.post(
                "/v1/client/conversations", json={"body": "hi"}, headers=headers
            )
            if r.status_code == 503:
                assert r.json()["code"] == "service_unavailable", r.text
            return r.status_code

        assert await create() == 201
        await _admin_exec(
            database_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        statuses = [await create() for _ in range(8)]
        assert set(statuses[:2]) <= {201, 503}, statuses  # one per pooled connection at most
        assert statuses[2:] == [201] * 6, statuses


async def test_the_pool_keeps_its_connections_under_a_load_above_its_size(
    database_url: str, tmp_path: Path
) -> None:
    """More sessions at once than TELLBACK_DATABASE_POOL_SIZE wait for a connection; none
    is opened beyond the size, and none is closed on its way back to the pool (an overflow
    pool closed them, and each new one is a PostgreSQL backend started cold)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("TELLBACK_DATABASE_POOL_SIZE sizes the PostgreSQL pool")
    settings = replace(make_settings(database_url, tmp_path / "data"), database_pool_size=3)
    db = Database(settings)
    pids: list[int] = []

    async def backend() -> None:
        async with db.session(write=True) as session:
            pids.append(int(await session.scalar(text("SELECT pg_backend_pid()")) or 0))
            await asyncio.sleep(0.01)

    try:
        for _ in range(5):
            await asyncio.gather(*(backend() for _ in range(8)))
        assert len(pids) == 40
        assert len(set(pids)) == 3
    finally:
        await db.dispose()


@pytest.mark.parametrize("webhooks", ["no webhooks", "webhooks"])
async def test_feedback_on_postgresql_is_one_statement_that_commits_by_itself(
    database_url: str,
    tmp_path: Path,
    registry: JobRegistry,
    monkeypatch: pytest.MonkeyPatch,
    webhooks: str,
) -> None:
    """A new feedback without attachments: one statement writing the conversation,
    message, event, key and the push job for the agent's phone (and, for an app with
    webhook endpoints, after a read of them, the deliveries with their jobs) together,
    with no BEGIN and no COMMIT around them (one round trip, or two, where a
    transaction took four or more). A replay of its key writes nothing and answers as
    before."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's writes share the write group's transaction")
    monkeypatch.setattr(engine, "_PING_AFTER_IDLE_SECONDS", 3600.0)  # no ping at checkout
    settings = make_settings(database_url, tmp_path / "data", webhook_allow_private=True)
    async with serve_app(settings, registry) as api:
        app = await api.create_app()
        user = await api.user_headers(app)
        path = "/v1/client/conversations"
        endpoints: list[str] = []
        if webhooks == "webhooks":
            # Wants every event; wants only message.created; disabled.
            hooks = f"/v1/admin/apps/{app.id}/webhooks"
            for events in ([], ["message.created"], []):
                body = {"url": "http://127.0.0.1:9/in", "events": events}
                r = await api.http.post(hooks, json=body, headers=api.admin)
                assert r.status_code == 201, r.text
                endpoints.append(r.json()["id"])
            off = {"enabled": False}
            r = await api.http.patch(f"{hooks}/{endpoints[2]}", json=off, headers=api.admin)
            assert r.status_code == 200, r.text
        # An agent's phone that may hear of new feedback: its push job too.
        _, agent = await api.create_agent(app)
        phone = {"platform": "ios", "push_provider": "apns", "push_token": "ab" * 32}
        r = await api.http.put("/v1/agent/devices/current", json=phone, headers=agent)
        assert r.status_code == 200, r.text
        r = await api.http.post(path, json={"body": "warm-up"}, headers=user)  # caches the session
        assert r.status_code == 201, r.text
        queries: list[str] = []

        def log(query: Any) -> None:
            queries.append(query.query)

        def log_queries(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            dbapi_connection.driver_connection.add_query_logger(log)

        def stop_logging(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.driver_connection.remove_query_logger(log)

        sync_engine = api.state.db.engine.sync_engine
        sqlalchemy_event.listen(sync_engine, "checkout", log_queries)
        sqlalchemy_event.listen(sync_engine, "checkin", stop_logging)
        try:
            headers = {**user, "Idempotency-Key": "two-statements"}
            first = await api.http.post(path, json={"body": "It crashes"}, headers=headers)
            assert first.status_code == 201, first.text
            # (the end user and the endpoints are read only for an app with webhooks)
            sent = ["SELECT", "WITH"] if endpoints else ["WITH"]
            assert [q.split(None, 1)[0] for q in queries] == sent, queries
            assert "INSERT INTO conversations" in queries[-1]
            assert "INSERT INTO idempotency_keys" in queries[-1]
            again = await api.http.post(path, json={"body": "It crashes"}, headers=headers)
            assert again.status_code == 201, again.text
            assert again.headers["idempotent-replayed"] == "true"
            assert again.content == first.content
        finally:
            sqlalchemy_event.remove(sync_engine, "checkout", log_queries)
            sqlalchemy_event.remove(sync_engine, "checkin", stop_logging)
        r = await api.http.get(path, headers=user)
        listed = r.json()["items"]
        assert [c["last_message"]["body"] for c in listed] == ["It crashes", "warm-up"]
        jobs = select(Job.kind, Job.payload)
        async with api.state.db.session(write=False) as db:
            queued = (await db.execute(jobs)).all()
        pushed = [p["message_id"] for kind, p in queued if kind == "push.fanout"]
        assert sorted(pushed) == sorted(c["last_message"]["id"] for c in listed)
        hooked = sorted(p["delivery_id"] for kind, p in queued if kind == "webhook.deliver")
        if endpoints:  # each feedback went to the one enabled endpoint that wants it, once
            r = await api.http.get(f"/v1/admin/apps/{app.id}/webhook-deliveries", headers=api.admin)
            deliveries = r.json()["items"]
            assert [(d["endpoint_id"], d["event_type"]) for d in deliveries] == [
                (endpoints[0], "conversation.created")
            ] * 2
            assert hooked == sorted(d["id"] for d in deliveries)
        else:
            assert hooked == []


async def test_feedback_on_postgresql_is_all_or_nothing(
    database_url: str, tmp_path: Path, registry: JobRegistry
) -> None:
    """When any part of the one statement fails (here the event's INSERT, refused by a
    trigger), nothing of the feedback is left: no conversation, message, webhook
    delivery, job or idempotency key. A retry with the same key creates it afresh."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's writes share the write group's transaction")
    settings = make_settings(database_url, tmp_path / "data", webhook_allow_private=True)
    async with serve_app(settings, registry) as api:
        app = await api.create_app()
        user = await api.user_headers(app)
        hook = {"url": "http://127.0.0.1:9/in"}
        r = await api.http.post(f"/v1/admin/apps/{app.id}/webhooks", json=hook, headers=api.admin)
        assert r.status_code == 201, r.text
        counts = text(
            "SELECT (SELECT count(*) FROM conversations), (SELECT count(*) FROM messages), "
            "(SELECT count(*) FROM events), (SELECT count(*) FROM webhook_deliveries), "
            "(SELECT count(*) FROM jobs), (SELECT count(*) FROM idempotency_keys)"
        )

        async def rows() -> list[int]:
            async with api.state.db.session(write=False) as db:
                return list((await db.execute(counts)).one())

        before = await rows()
        await _admin_exec(
            database_url,
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
            "CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse()",
        )
        path, body = "/v1/client/conversations", {"body": "It crashes"}
        headers = {**user, "Idempotency-Key": "all-or-nothing"}
        r = await api.http.post(path, json=body, headers=headers)
        assert r.status_code == 500, r.text
        assert "refused" not in r.text
        assert await rows() == before
        await _admin_exec(database_url, "DROP TRIGGER refuse ON events")
        r = await api.http.post(path, json=body, headers=headers)
        assert r.status_code == 201, r.text
        assert "idempotent-replayed" not in r.headers
        after = await rows()
        # A conversation, its message, its event, a delivery with its job, and the key.
        assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1, 1, 1]


def test_the_server_freezes_its_startup_heap_and_collects_young_objects_less_often() -> None:
    """What `tellback serve` and `tellback worker` do once started (cli.freeze_startup_heap)."""
    before = gc.get_threshold()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert before[0] < GC_YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


_ALL = "0.0.0.0"  # noqa: S104 (settings only: nothing binds)


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        pytest.param({}, [], id="sqlite-loopback"),
        pytest.param({"TELLBACK_HOST": _ALL}, ["serve.no_public_url"], id="no-public-url"),
        pytest.param(
            {"TELLBACK_HOST": _ALL, "TELLBACK_PUBLIC_URL": "https://fb.example.com"},
            [],
            id="public-url",
        ),
        pytest.param(
            {"TELLBACK_DATABASE_URL": "postgresql+asyncpg://db/tellback"},
            ["serve.local_storage"],
            id="postgresql-local-disk",
        ),
        pytest.param(
            {
                "TELLBACK_DATABASE_URL": "postgresql+asyncpg://db/tellback",
                "TELLBACK_S3_ENDPOINT": "s3.example.com",
                "TELLBACK_S3_ACCESS_KEY": "a",
                "TELLBACK_S3_SECRET_KEY": "b",
            },
            [],
            id="postgresql-s3",
        ),
    ],
)
def test_serve_warns_of_what_breaks_past_one_machine(
    env: dict[str, str], warned: list[str]
) -> None:
    """Links naming 0.0.0.0 reach no client; files on one machine's disk, no other
    machine's process. Both work on one machine, so they are warnings, said at start."""
    with capture_logs() as logs:
        cli._warn_about_links_and_storage(load_settings(env))
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == warned


def test_the_pool_size_is_a_setting() -> None:
    assert load_settings({}).database_pool_size == 20
    assert load_settings({"TELLBACK_DATABASE_POOL_SIZE": "64"}).database_pool_size == 64
    with pytest.raises(SettingsError, match="TELLBACK_DATABASE_POOL_SIZE"):
        load_settings({"TELLBACK_DATABASE_POOL_SIZE": "0"})


def test_the_heartbeat_is_at_most_the_20_seconds_clients_are_promised() -> None:
    assert load_settings({}).sse_heartbeat_seconds == 15
    assert load_settings({"TELLBACK_SSE_HEARTBEAT_SECONDS": "20"}).sse_heartbeat_seconds == 20
    with pytest.raises(SettingsError, match="TELLBACK_SSE_HEARTBEAT_SECONDS"):
        load_settings({"TELLBACK_SSE_HEARTBEAT_SECONDS": "60"})


# ----- pagination under concurrent inserts ------------------------------------------------------


def _ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


async def _walk(
    api: Api,
    path: str,
    headers: dict[str, str],
    between_pages: Any,
    params: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """All items of a list endpoint, 7 at a time, calling ``between_pages`` after each page."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(30):
        query: dict[str, str] = {**(params or {}), "limit": "7"}
        if cursor is not None:
            query["cursor"] = cursor
        r = await api.http.get(path, params=query, headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()
        assert set(page) >= {"items", "next_cursor"}
        assert len(page["items"]) <= 7
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
        assert page["items"], "a page with a next_cursor is not empty"
        await between_pages()
    raise AssertionError("the walk never ended")


async def _unlimited_app(api: Api) -> tuple[AppInfo, dict[str, str], dict[str, str]]:
    app = await api.create_app(rate_limits=UNLIMITED)
    _, agent = await api.create_agent(app)
    return app, await api.user_headers(app), agent


async def test_client_conversation_pages_are_stable_under_inserts(api: Api) -> None:
    app, user, _ = await _unlimited_app(api)
    other_user = await api.user_headers(app)
    originals = [(await api.feedback(user, body=f"original {i}"))["id"] for i in range(30)]
    inserted: list[str] = []

    async def insert() -> None:
        inserted.append((await api.feedback(user, body="inserted"))["id"])
        await api.feedback(other_user, body="someone else")

    seen = await _walk(api, "/v1/client/conversations", user, insert)
    ids = [c["id"] for c in seen]
    assert len(ids) == len(set(ids)), "an item was repeated"
    assert [i for i in ids if i in set(originals)] == originals[::-1]
    assert set(ids) <= set(originals) | set(inserted), "another user's conversation leaked"
    times = [_ts(c["updated_at"]) for c in seen]
    assert times == sorted(times, reverse=True), "not newest activity first"
    for c in seen:
        assert {"id", "status", "subject", "created_at", "updated_at"} <= set(c)
        assert {"last_message", "unread_count"} <= set(c)
    assert inserted, "nothing was inserted during the walk"

    # A fresh walk sees everything exactly once, the inserted ones first.
    async def nothing() -> None:
        return None

    again = [c["id"] for c in await _walk(api, "/v1/client/conversations", user, nothing)]
    assert again == inserted[::-1] + originals[::-1]


@pytest.mark.parametrize("by_app", [False, True])
async def test_agent_conversation_pages_are_stable_under_inserts(api: Api, by_app: bool) -> None:
    app, user, agent = await _unlimited_app(api)
    other_user = await api.user_headers(app)
    originals = [(await api.feedback(user, body=f"original {i}"))["id"] for i in range(30)]
    inserted: list[str] = []

    async def insert() -> None:
        inserted.append((await api.feedback(user, body="inserted"))["id"])
        inserted.append((await api.feedback(other_user, body="inserted"))["id"])

    params = {"app_id": app.id} if by_app else None
    seen = await _walk(api, "/v1/agent/conversations", agent, insert, params)
    ids = [c["id"] for c in seen]
    assert len(ids) == len(set(ids)), "an item was repeated"
    assert [i for i in ids if i in set(originals)] == originals[::-1]
    assert set(ids) <= set(originals) | set(inserted)
    times = [_ts(c["last_activity_at"]) for c in seen]
    assert times == sorted(times, reverse=True), "not newest activity first"
    assert inserted


async def _conversation_with_messages(
    api: Api, user: dict[str, str], agent: dict[str, str]
) -> tuple[str, list[str], list[str]]:
    """A conversation of 30 messages: (id, ids the user sees, ids the agent sees)."""
    conv = await api.feedback(user, body="message 0")
    public = [conv["last_message"]["id"]]
    everything = list(public)
    for i in range(1, 30):
        if i % 5 == 0:
            r = await api.http.post(
                f"/v1/agent/conversations/{conv['id']}/messages",
                json={"body": f"note {i}", "internal": True},
                headers=agent,
            )
            assert r.status_code == 201, r.text
            everything.append(r.json()["id"])
            continue
        r = await api.http.post(
            f"/v1/client/conversations/{conv['id']}/messages",
            json={"body": f"message {i}"},
            headers=user,
        )
        assert r.status_code == 201, r.text
        public.append(r.json()["id"])
        everything.append(r.json()["id"])
    return conv["id"], public, everything


async def test_message_pages_are_stable_under_appends(api: Api) -> None:
    _, user, agent = await _unlimited_app(api)
    conv_id, public, _ = await _conversation_with_messages(api, user, agent)
    appended_public: list[str] = []
    path = f"/v1/client/conversations/{conv_id}/messages"

    async def append() -> None:
        r = await api.http.post(path, json={"body": "appended"}, headers=user)
        assert r.status_code == 201, r.text
        appended_public.append(r.json()["id"])
        r = await api.http.post(
            f"/v1/agent/conversations/{conv_id}/messages", json={"body": "reply"}, headers=agent
        )
        assert r.status_code == 201, r.text
        appended_public.append(r.json()["id"])
        r = await api.http.post(
            f"/v1/agent/conversations/{conv_id}/messages",
            json={"body": "secret note", "internal": True},
            headers=agent,
        )
        assert r.status_code == 201, r.text

    seen = await _walk(api, path, user, append)
    ids = [m["id"] for m in seen]
    assert len(ids) == len(set(ids)), "a message was repeated"
    assert ids == public + appended_public, "oldest first, nothing skipped, no internal notes"
    times = [_ts(m["created_at"]) for m in seen]
    assert times == sorted(times)
    assert all(m["body"] != "secret note" for m in seen)
    assert appended_public


async def test_agent_message_pages_are_stable_under_appends(api: Api) -> None:
    _, user, agent = await _unlimited_app(api)
    conv_id, _, everything = await _conversation_with_messages(api, user, agent)
    appended: list[str] = []
    path = f"/v1/agent/conversations/{conv_id}/messages"

    async def append() -> None:
        r = await api.http.post(
            f"/v1/client/conversations/{conv_id}/messages", json={"body": "more"}, headers=user
        )
        assert r.status_code == 201, r.text
        appended.append(r.json()["id"])
        r = await api.http.post(path, json={"body": "note", "internal": True}, headers=agent)
        assert r.status_code == 201, r.text
        appended.append(r.json()["id"])

    seen = await _walk(api, path, agent, append)
    ids = [m["id"] for m in seen]
    assert len(ids) == len(set(ids)), "a message was repeated"
    assert ids == everything + appended
    times = [_ts(m["created_at"]) for m in seen]
    assert times == sorted(times)
    assert appended


async def test_a_background_task_that_overruns_the_shutdown_is_cancelled_quietly() -> None:
    """At shutdown the lifespan waits a bounded time for the job worker and the rate
    limit sync. One that overruns (the database down: a pool timeout, then the wait for
    running jobs) or failed is logged and left behind, and the shutdown goes on to close
    the push clients and the pool; before, its TimeoutError ended the shutdown there."""
    running = asyncio.Event()

    async def stubborn() -> None:  # never looks at its stop event
        running.set()
        await asyncio.sleep(3600)

    async def failing() -> None:
        raise RuntimeError("the worker failed")

    task = asyncio.create_task(stubborn())
    await running.wait()
    await stopped(task, 0.05, "stubborn")
    assert task.cancelled()
    await stopped(asyncio.create_task(failing()), 1, "failing")
    # A shutdown that is itself cancelled still is.
    running.clear()
    task = asyncio.create_task(stubborn())
    await running.wait()
    shutdown = asyncio.create_task(stopped(task, 60, "stubborn"))
    await asyncio.sleep(0.01)
    shutdown.cancel()
    with pytest.raises(asyncio.CancelledError):
        await shutdown
    assert task.cancelled()
