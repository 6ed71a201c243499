"""Bad input gets a clear 4xx problem+json and changes nothing.

Every rejected request is followed by a look at the list endpoints, so a
validation that runs after a write (and leaves the write behind) fails here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy.exc
from structlog.testing import capture_logs

from tellback_server.asgi import build_state, create_app
from tellback_server.domain.conversations.services import ConversationService
from tellback_server.jobs.registry import JobRegistry
from tests.server.conftest import (
    Api,
    AppInfo,
    identity_token,
    lifespan,
    make_settings,
    serve_app,
)

PROBLEM_JSON = "application/problem+json"
VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Validation tests send many requests as one end user; the limiter is tested in test_ops.
UNLIMITED: dict[str, int] = {"app_per_minute": 0, "user_per_minute": 0}


# ----- helpers -------------------------------------------------------------------------------


def assert_problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """An RFC 9457 document with Tellback's members; returns the parsed body."""
    assert r.status_code == status, r.text
    media_type = r.headers.get("content-type", "").split(";")[0].strip()
    assert media_type == PROBLEM_JSON, r.headers.get("content-type")
    body = r.json()
    assert isinstance(body, dict), body
    for member in ("type", "title", "status", "code", "detail"):
        assert member in body, f"problem lacks {member!r}: {body}"
    assert body["status"] == status
    assert isinstance(body["type"], str)
    assert body["type"]
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["code"], str)
    assert body["code"]
    assert isinstance(body["detail"], str)
    assert body["detail"].strip(), "detail must say what is wrong"
    if code is not None:
        assert body["code"] == code, body
    return body


def error_fields(problem: dict[str, Any]) -> list[str]:
    errors = problem.get("errors")
    assert isinstance(errors, list), f"a 422 carries an errors list: {problem}"
    assert errors, problem
    fields: list[str] = []
    for error in errors:
        assert isinstance(error, dict)
        assert isinstance(error.get("field"), str)
        assert isinstance(error.get("message"), str)
        assert error["message"]
        fields.append(error["field"])
    return fields


def names_field(field: str, expected: str) -> bool:
    """``field`` is ``expected`` or a member/item of it (``location.latitude``, ``tags[0]``)."""
    return field == expected or field.startswith((f"{expected}.", f"{expected}["))


def assert_validation(r: httpx.Response, field: str) -> dict[str, Any]:
    problem = assert_problem(r, 422, "validation_failed")
    fields = error_fields(problem)
    assert any(names_field(f, field) for f in fields), f"expected {field!r} in {fields}"
    return problem


async def conversation_ids(api: Api, headers: dict[str, str]) -> list[str]:
    r = await api.http.get("/v1/client/conversations", params={"limit": 100}, headers=headers)
    assert r.status_code == 200, r.text
    return [c["id"] for c in r.json()["items"]]


async def message_ids(api: Api, headers: dict[str, str], conv_id: str) -> list[str]:
    r = await api.http.get(
        f"/v1/client/conversations/{conv_id}/messages", params={"limit": 100}, headers=headers
    )
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["items"]]


async def agent_conversation_ids(api: Api, agent: dict[str, str]) -> list[str]:
    r = await api.http.get("/v1/agent/conversations", params={"limit": 100}, headers=agent)
    assert r.status_code == 200, r.text
    return [c["id"] for c in r.json()["items"]]


async def unlimited_user(api: Api, **settings: Any) -> tuple[AppInfo, dict[str, str]]:
    app = await api.create_app(rate_limits=UNLIMITED, **settings)
    return app, await api.user_headers(app)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ----- malformed JSON --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{bad", id="not-json"),
        pytest.param(b'{"body": "x"', id="truncated"),
        pytest.param(b'{"body": "x",}', id="trailing-comma"),
        pytest.param(b'{"body": "x"} trailing', id="trailing-garbage"),
        pytest.param(b"\xff\xfe\x00{", id="not-utf8"),
        pytest.param(b"", id="empty"),
    ],
)
async def test_malformed_json_is_400_bad_request(api: Api, raw: bytes) -> None:
    _, user = await unlimited_user(api)
    r = await api.http.post(
        "/v1/client/conversations",
        content=raw,
        headers={**user, "Content-Type": "application/json"},
    )
    problem = assert_problem(r, 400, "bad_request")
    assert "'data'" not in problem["detail"], "the detail must not be a bare KeyError"
    assert await conversation_ids(api, user) == []


async def test_malformed_json_on_every_kind_of_caller(api: Api) -> None:
    app, user = await unlimited_user(api)
    _, agent = await api.create_agent(app)
    conv = await api.feedback(user)
    json_ct = {"Content-Type": "application/json"}
    cases = [
        ("/v1/client/sessions", {}),
        (f"/v1/client/conversations/{conv['id']}/messages", user),
        (f"/v1/agent/conversations/{conv['id']}/messages", agent),
        ("/v1/admin/apps", api.admin),
    ]
    for path, headers in cases:
        r = await api.http.post(path, content=b'{"body": ', headers={**headers, **json_ct})
        assert_problem(r, 400, "bad_request")
    assert await message_ids(api, user, conv["id"]) == [conv["last_message"]["id"]]


# ----- wrong types and bounds on feedback -------------------------------------------------------

LOC = {"latitude": 48.1, "longitude": 11.5}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param({"body": 42}, "body", id="body-number"),
        pytest.param({"body": None}, "body", id="body-null"),
        pytest.param({"body": ["x"]}, "body", id="body-list"),
        pytest.param({"body": "x" * 10001}, "body", id="body-10001-chars"),
        pytest.param({"body": ""}, "body", id="body-empty"),
        pytest.param({"body": "  \n\t "}, "body", id="body-blank"),
        pytest.param({"body": "x", "tags": "crash"}, "tags", id="tags-string"),
        pytest.param({"body": "x", "tags": [1]}, "tags", id="tag-number"),
        pytest.param({"body": "x", "tags": [f"t{i}" for i in range(21)]}, "tags", id="21-tags"),
        pytest.param({"body": "x", "tags": ["   "]}, "tags", id="tag-blank"),
        pytest.param({"body": "x", "tags": ["t" * 51]}, "tags", id="tag-51-chars"),
        pytest.param({"body": "x", "subject": 7}, "subject", id="subject-number"),
        pytest.param({"body": "x", "subject": "s" * 301}, "subject", id="subject-301-chars"),
        pytest.param({"body": "x", "category": 3}, "category", id="category-number"),
        pytest.param({"body": "x", "custom_fields": []}, "custom_fields", id="custom-list"),
        pytest.param({"body": "x", "context": "ctx"}, "context", id="context-string"),
        pytest.param({"body": "x", "context": {"app": 1}}, "context", id="context-app-number"),
        pytest.param({"body": "x", "attachment_ids": "a"}, "attachment_ids", id="att-string"),
        pytest.param({"body": "x", "location": "here"}, "location", id="location-string"),
        pytest.param(
            {"body": "x", "location": {**LOC, "latitude": 91}},
            "location.latitude",
            id="latitude-91",
        ),
        pytest.param(
            {"body": "x", "location": {**LOC, "latitude": -90.5}},
            "location.latitude",
            id="latitude-minus-90.5",
        ),
        pytest.param(
            {"body": "x", "location": {**LOC, "longitude": -181}},
            "location.longitude",
            id="longitude-minus-181",
        ),
        pytest.param(
            {"body": "x", "location": {**LOC, "longitude": 180.01}},
            "location.longitude",
            id="longitude-180.01",
        ),
        pytest.param(
            {"body": "x", "location": {**LOC, "accuracy_m": -1}},
            "location.accuracy_m",
            id="accuracy-negative",
        ),
        pytest.param(
            {"body": "x", "location": {"latitude": 48.1}}, "location", id="longitude-missing"
        ),
        pytest.param(
            {"body": "x", "location": {**LOC, "captured_at": "yesterday"}},
            "location.captured_at",
            id="captured-at-not-a-time",
        ),
        pytest.param(
            {"body": "x", "location": {**LOC, "captured_at": "0001-01-01T00:00:00+01:00"}},
            "location.captured_at",
            id="captured-at-before-year-1-in-utc",
        ),
        pytest.param(
            {"body": "x", "location": {**LOC, "captured_at": "9999-12-31T23:30:00-01:00"}},
            "location.captured_at",
            id="captured-at-after-year-9999-in-utc",
        ),
    ],
)
async def test_wrong_types_and_bounds_are_422_naming_the_field(
    api: Api, payload: dict[str, Any], field: str
) -> None:
    _, user = await unlimited_user(api)
    r = await api.http.post("/v1/client/conversations", json=payload, headers=user)
    assert_validation(r, field)
    assert await conversation_ids(api, user) == []


async def test_a_locations_time_is_stored_in_utc_and_one_without_utc_is_refused(api: Api) -> None:
    """A follow-up's location is checked like a new conversation's, before anything is
    written; a time without an offset is taken as UTC. (A time with no UTC equivalent
    was stored as given and made every console page of its conversation a 500.)"""
    _, user = await unlimited_user(api)
    naive = {**LOC, "captured_at": "2026-11-28T10:15:00"}
    r = await api.http.post(
        "/v1/client/conversations", json={"body": "x", "location": naive}, headers=user
    )
    assert r.status_code == 201, r.text
    conv = r.json()
    assert conv["location"]["captured_at"] == "2026-11-28T10:15:00Z"
    offset = {**LOC, "captured_at": "2026-11-28T10:15:00+02:00"}
    path = f"/v1/client/conversations/{conv['id']}/messages"
    r = await api.http.post(path, json={"location": offset}, headers=user)
    assert r.status_code == 201, r.text
    assert r.json()["location"]["captured_at"] == "2026-11-28T08:15:00Z"
    far = {**LOC, "captured_at": "0001-01-01T00:00:00+01:00"}
    r = await api.http.post(path, json={"body": "y", "location": far}, headers=user)
    assert_validation(r, "location.captured_at")
    page = (await api.http.get(path, headers=user)).json()
    assert [m["body"] for m in page["items"]] == ["x", None]


async def test_missing_body_names_the_body_field(api: Api) -> None:
    """A missing required member is reported under its own name, not a handler's."""
    _, user = await unlimited_user(api)
    r = await api.http.post("/v1/client/conversations", json={"subject": "x"}, headers=user)
    problem = assert_validation(r, "body")
    assert "data" not in error_fields(problem), "'data' is not a field of the request"
    assert await conversation_ids(api, user) == []


async def test_json_that_is_not_an_object_is_422(api: Api) -> None:
    _, user = await unlimited_user(api)
    payloads: list[Any] = [[], "body", 3, None]
    for payload in payloads:
        r = await api.http.post(
            "/v1/client/conversations",
            content=json.dumps(payload).encode(),
            headers={**user, "Content-Type": "application/json"},
        )
        assert_problem(r, 422, "validation_failed")
    assert await conversation_ids(api, user) == []


async def test_boundary_values_are_accepted(api: Api) -> None:
    """The bounds are inclusive: the rejections above are not plain over-strictness."""
    _, user = await unlimited_user(api)
    first = await api.feedback(
        user,
        body="x" * 10000,
        tags=[f"t{i}" for i in range(20)],
        location={"latitude": 90, "longitude": -180, "accuracy_m": 0},
    )
    assert first["last_message"]["body"] == "x" * 10000
    assert len(first["tags"]) == 20
    assert first["location"]["latitude"] == 90
    assert first["location"]["longitude"] == -180
    second = await api.feedback(
        user, body="y", location={"latitude": -90, "longitude": 180, "label": "l" * 200}
    )
    assert second["location"]["longitude"] == 180
    assert sorted(await conversation_ids(api, user)) == sorted([first["id"], second["id"]])


# ----- body size -------------------------------------------------------------------------------


async def test_body_over_default_limit_is_413(api: Api) -> None:
    _, user = await unlimited_user(api)
    too_big = b'{"body": "' + b"x" * (1024 * 1024) + b'"}'
    r = await api.http.post(
        "/v1/client/conversations",
        content=too_big,
        headers={**user, "Content-Type": "application/json"},
    )
    assert_problem(r, 413, "payload_too_large")
    r = await api.http.post(
        "/v1/client/sessions",
        content=b'{"app_key": "' + b"k" * (1024 * 1024 + 1) + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert_problem(r, 413, "payload_too_large")
    assert await conversation_ids(api, user) == []


@pytest.fixture
async def small_body_api(api: Api, tmp_path: Path) -> AsyncIterator[Api]:
    """A second app instance on the same database with max_request_body_bytes=2048."""
    settings = make_settings(
        api.state.settings.database_url, tmp_path / "small", max_request_body_bytes=2048
    )
    state = build_state(settings)
    app = create_app(settings, state=state)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://small.test") as client,
    ):
        yield Api(http=client, state=state, admin_token=api.admin_token)


async def test_body_over_configured_limit_is_413(small_body_api: Api) -> None:
    api = small_body_api
    _, user = await unlimited_user(api)
    ok = await api.feedback(user, body="y" * 1500)
    assert ok["last_message"]["body"] == "y" * 1500
    r = await api.http.post("/v1/client/conversations", json={"body": "x" * 3000}, headers=user)
    assert_problem(r, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"body": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    # Without Content-Length the limit still holds while the body streams in.
    r = await api.http.post(
        "/v1/client/conversations",
        content=chunks(),
        headers={**user, "Content-Type": "application/json"},
    )
    assert_problem(r, 413, "payload_too_large")
    assert await conversation_ids(api, user) == [ok["id"]]


# ----- custom fields ---------------------------------------------------------------------------

CUSTOM_FIELDS: list[dict[str, Any]] = [
    {"key": "order_id", "type": "string", "max_length": 10, "required": True},
    {"key": "amount", "type": "number"},
    {"key": "quantity", "type": "integer"},
    {"key": "gift", "type": "boolean"},
    {"key": "plan", "type": "select", "options": ["free", "pro"]},
    {"key": "platforms", "type": "multiselect", "options": ["ios", "android", "web"]},
]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("order_id", 12345, id="string-got-number"),
        pytest.param("order_id", "x" * 11, id="string-over-max-length"),
        pytest.param("order_id", ["A-1"], id="string-got-list"),
        pytest.param("amount", "12.5", id="number-got-string"),
        pytest.param("amount", True, id="number-got-bool"),
        pytest.param("amount", {"v": 1}, id="number-got-object"),
        pytest.param("quantity", 1.5, id="integer-got-float"),
        pytest.param("quantity", "3", id="integer-got-string"),
        pytest.param("quantity", False, id="integer-got-bool"),
        pytest.param("gift", "true", id="boolean-got-string"),
        pytest.param("gift", 1, id="boolean-got-number"),
        pytest.param("plan", "gold", id="select-not-an-option"),
        pytest.param("plan", ["pro"], id="select-got-list"),
        pytest.param("plan", 1, id="select-got-number"),
        pytest.param("platforms", "ios", id="multiselect-got-string"),
        pytest.param("platforms", ["ios", "mac"], id="multiselect-not-an-option"),
        pytest.param("platforms", [1], id="multiselect-got-number"),
    ],
)
async def test_wrong_custom_field_value_is_422(api: Api, key: str, value: Any) -> None:
    _, user = await unlimited_user(api, custom_fields=CUSTOM_FIELDS)
    values: dict[str, Any] = {"order_id": "A-1", key: value}
    r = await api.http.post(
        "/v1/client/conversations",
        json={"body": "x", "custom_fields": values},
        headers=user,
    )
    problem = assert_validation(r, f"custom_fields.{key}")
    assert error_fields(problem) == [f"custom_fields.{key}"], "only the bad field is blamed"
    assert key in problem["detail"]
    assert await conversation_ids(api, user) == []


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="absent"),
        pytest.param({"order_id": None}, id="null"),
        pytest.param({"amount": 3}, id="others-given"),
    ],
)
async def test_missing_required_custom_field_is_422(api: Api, values: dict[str, Any]) -> None:
    _, user = await unlimited_user(api, custom_fields=CUSTOM_FIELDS)
    r = await api.http.post(
        "/v1/client/conversations", json={"body": "x", "custom_fields": values}, headers=user
    )
    problem = assert_validation(r, "custom_fields.order_id")
    assert "order_id" in problem["detail"]
    assert await conversation_ids(api, user) == []
    # Leaving custom_fields out altogether is no way around it.
    r = await api.http.post("/v1/client/conversations", json={"body": "x"}, headers=user)
    assert_validation(r, "custom_fields.order_id")
    assert await conversation_ids(api, user) == []


async def test_unknown_custom_field_is_422(api: Api) -> None:
    _, user = await unlimited_user(api, custom_fields=CUSTOM_FIELDS)
    r = await api.http.post(
        "/v1/client/conversations",
        json={"body": "x", "custom_fields": {"order_id": "A-1", "coupon": "FREE"}},
        headers=user,
    )
    problem = assert_validation(r, "custom_fields.coupon")
    assert "coupon" in problem["detail"]
    assert await conversation_ids(api, user) == []
    # An app without definitions accepts no custom fields at all.
    _, plain_user = await unlimited_user(api)
    r = await api.http.post(
        "/v1/client/conversations",
        json={"body": "x", "custom_fields": {"coupon": "FREE"}},
        headers=plain_user,
    )
    assert_validation(r, "custom_fields.coupon")
    assert await conversation_ids(api, plain_user) == []


async def test_valid_custom_fields_are_stored_and_returned(api: Api) -> None:
    app, user = await unlimited_user(api, custom_fields=CUSTOM_FIELDS)
    _, agent = await api.create_agent(app)
    # Falsy values (0, false) and the exact max_length are valid and must survive.
    full = {
        "order_id": "x" * 10,
        "amount": 12.5,
        "quantity": 0,
        "gift": False,
        "plan": "pro",
        "platforms": ["ios", "web"],
    }
    conv = await api.feedback(user, custom_fields=full)
    assert conv["custom_fields"] == full
    minimal = await api.feedback(user, custom_fields={"order_id": "B-2", "amount": 3})
    assert minimal["custom_fields"] == {"order_id": "B-2", "amount": 3}

    r = await api.http.get(f"/v1/client/conversations/{conv['id']}", headers=user)
    assert r.status_code == 200, r.text
    assert r.json()["custom_fields"] == full
    r = await api.http.get(f"/v1/agent/conversations/{conv['id']}", headers=agent)
    assert r.status_code == 200, r.text
    assert r.json()["custom_fields"] == full
    assert sorted(await conversation_ids(api, user)) == sorted([conv["id"], minimal["id"]])


# ----- categories, context, attachments ----------------------------------------------------------


async def test_category_must_be_one_of_the_apps(api: Api) -> None:
    _, user = await unlimited_user(api, categories=["bug", "idea"])
    r = await api.http.post(
        "/v1/client/conversations", json={"body": "x", "category": "praise"}, headers=user
    )
    problem = assert_validation(r, "category")
    assert error_fields(problem) == ["category"]
    assert await conversation_ids(api, user) == []
    conv = await api.feedback(user, category="idea")
    assert conv["category"] == "idea"
    assert await conversation_ids(api, user) == [conv["id"]]


async def test_feedback_refused_by_the_apps_rules_needs_no_database_connection(
    database_url: str, tmp_path: Path, registry: JobRegistry
) -> None:
    """PostgreSQL: a new feedback's connection is checked out at its first statement,
    so one the app's rules refuse is answered at once even while every pooled
    connection is busy (or the database is down), instead of waiting for one."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite's writes take the process's write lock, not a pooled connection")
    settings = make_settings(database_url, tmp_path / "data", database_pool_size=2)
    async with serve_app(settings, registry) as api:
        _, user = await unlimited_user(api, categories=["bug"])
        assert await conversation_ids(api, user) == []  # the session is now in the cache
        engine = api.state.db.engine
        held = [await engine.connect() for _ in range(2)]
        try:
            r = await asyncio.wait_for(
                api.http.post(
                    "/v1/client/conversations",
                    json={"body": "x", "category": "praise"},
                    headers=user,
                ),
                timeout=5,  # (the pool would have kept it waiting 10 s, then a 503)
            )
            assert_validation(r, "category")
        finally:
            for connection in held:
                await connection.close()
        assert await conversation_ids(api, user) == []


async def test_any_category_when_the_app_defines_none(api: Api) -> None:
    _, user = await unlimited_user(api)
    conv = await api.feedback(user, category="anything at all")
    assert conv["category"] == "anything at all"
    r = await api.http.get(f"/v1/client/conversations/{conv['id']}", headers=user)
    assert r.json()["category"] == "anything at all"


async def test_context_over_64_kib_is_422(api: Api) -> None:
    _, user = await unlimited_user(api)
    r = await api.http.post(
        "/v1/client/conversations",
        json={"body": "x", "context": {"extra": {"blob": "x" * (64 * 1024 + 1)}}},
        headers=user,
    )
    assert_validation(r, "context")
    r = await api.http.post(
        "/v1/client/conversations",
        json={
            "body": "x",
            "context": {
                "device": {f"k{i}": "v" * 1000 for i in range(40)},
                "extra": {f"k{i}": "v" * 1000 for i in range(40)},
            },
        },
        headers=user,
    )
    assert_validation(r, "context")
    assert await conversation_ids(api, user) == []
    # Well under the limit is fine.
    conv = await api.feedback(user, context={"extra": {"blob": "x" * (60 * 1024)}})
    assert await conversation_ids(api, user) == [conv["id"]]


# ----- the NUL character ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param({"body": "a\u0000b"}, "body", id="body"),
        pytest.param({"body": "x", "subject": "s\u0000"}, "subject", id="subject"),
        pytest.param({"body": "x", "tags": ["ok", "t\u0000"]}, "tags[1]", id="list-item"),
        pytest.param(
            {"body": "x", "context": {"extra": {"k": "\u0000"}}}, "context.extra.k", id="nested"
        ),
        pytest.param(
            {"body": "x", "context": {"extra": {"k\u0000": 1}}},
            "context.extra.k\\u0000",  # (the key as JSON would escape it)
            id="key",
        ),
    ],
)
async def test_nul_in_a_json_string_is_422_on_every_database(
    api: Api, payload: dict[str, Any], field: str
) -> None:
    """PostgreSQL's text and JSONB cannot hold U+0000: it failed there with a 500 while
    SQLite stored it. Refused on both, naming the field, before anything is written."""
    _, user = await unlimited_user(api)
    r = await api.http.post("/v1/client/conversations", json=payload, headers=user)
    problem = assert_validation(r, re.split(r"[.\[]", field, maxsplit=1)[0])
    assert error_fields(problem) == [field]
    assert "NUL" in problem["detail"]
    assert await conversation_ids(api, user) == []


async def test_nul_is_refused_wherever_a_caller_writes(api: Api) -> None:
    app, user = await unlimited_user(api)
    conv = await api.feedback(user)
    r = await api.http.patch("/v1/client/me", json={"name": "x\u0000"}, headers=user)
    assert_validation(r, "name")
    r = await api.http.post(
        f"/v1/client/conversations/{conv['id']}/messages", json={"body": "\u0000"}, headers=user
    )
    assert_validation(r, "body")
    _, agent = await api.create_agent(app)
    r = await api.http.post(
        f"/v1/agent/conversations/{conv['id']}/messages", json={"body": "hi\u0000"}, headers=agent
    )
    assert_validation(r, "body")
    r = await api.http.patch(f"/v1/admin/apps/{app.id}", json={"name": "\u0000"}, headers=api.admin)
    assert_validation(r, "name")
    assert await message_ids(api, user, conv["id"]) == [conv["last_message"]["id"]]
    r = await api.http.get("/v1/client/me", headers=user)
    assert r.json()["name"] is None


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("/v1/agent/conversations?q=a%00b", id="query"),
        pytest.param("/v1/agent/conversations?tag=%00", id="query-filter"),
        pytest.param("/v1/admin/apps/{app}/identity-secrets/k%00", id="path"),
    ],
)
async def test_nul_in_the_url_is_400(api: Api, url: str) -> None:
    app, _ = await unlimited_user(api)
    _, agent = await api.create_agent(app)
    headers = api.admin if "admin" in url else agent
    method = "DELETE" if "identity-secrets" in url else "GET"
    r = await api.http.request(method, url.replace("{app}", app.id), headers=headers)
    problem = assert_problem(r, 400, "bad_request")
    assert "NUL" in problem["detail"]
    # The app's identity secret is still there.
    r = await api.http.get(f"/v1/admin/apps/{app.id}", headers=api.admin)
    assert r.status_code == 200, r.text


async def test_nul_in_an_identity_tokens_claims(api: Api) -> None:
    """Claims arrive base64-encoded inside the token, past the body's check: a ``sub``
    with U+0000 is refused as an invalid token, a name or email loses the character."""
    app = await api.create_app()

    async def session(sub: str, **claims: Any) -> httpx.Response:
        token = identity_token(app.identity_secret, sub, kid=app.identity_kid, **claims)
        return await api.http.post(
            "/v1/client/sessions",
            json={"app_key": app.app_key, "installation_id": uuid.uuid4().hex, "user_token": token},
        )

    problem = assert_problem(await session("u\x00x"), 401, "unauthenticated")
    assert "NUL" in problem["detail"]
    r = await session("grace", name="Grace\x00 Hopper", email="grace\x00@example.com")
    assert r.status_code == 201, r.text
    me = await api.http.get("/v1/client/me", headers=api.bearer(r.json()["session_token"]))
    assert (me.json()["name"], me.json()["email"]) == ("Grace Hopper", "grace@example.com")


async def test_an_escaped_backslash_before_u0000_is_plain_text(api: Api) -> None:
    """``"\\u0000"`` in JSON is a backslash and five characters, which are kept."""
    _, user = await unlimited_user(api)
    conv = await api.feedback(user, body="path C:\\u0000 and \\\\u0000")
    assert conv["last_message"]["body"] == "path C:\\u0000 and \\\\u0000"


async def test_unknown_attachment_id_is_422(api: Api) -> None:
    _, user = await unlimited_user(api)
    for ids in (["att_does_not_exist"], [str(uuid.uuid4())]):
        r = await api.http.post(
            "/v1/client/conversations", json={"body": "x", "attachment_ids": ids}, headers=user
        )
        assert_validation(r, "attachment_ids")
    assert await conversation_ids(api, user) == []
    conv = await api.feedback(user)
    r = await api.http.post(
        f"/v1/client/conversations/{conv['id']}/messages",
        json={"body": "x", "attachment_ids": [str(uuid.uuid4())]},
        headers=user,
    )
    assert_validation(r, "attachment_ids")
    assert await message_ids(api, user, conv["id"]) == [conv["last_message"]["id"]]


# ----- messages --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param({}, "body", id="nothing"),
        pytest.param({"body": None}, "body", id="body-null"),
        pytest.param({"attachment_ids": []}, "body", id="no-attachments"),
        pytest.param({"body": None, "location": None}, "body", id="all-null"),
        pytest.param({"body": "   "}, "body", id="body-blank"),
        pytest.param({"body": "x" * 10001}, "body", id="body-10001-chars"),
        pytest.param({"body": 5}, "body", id="body-number"),
        pytest.param({"location": {**LOC, "latitude": 91}}, "location.latitude", id="lat-91"),
        pytest.param({"location": {**LOC, "longitude": -181}}, "location.longitude", id="lon"),
    ],
)
async def test_bad_message_is_422(api: Api, payload: dict[str, Any], field: str) -> None:
    _, user = await unlimited_user(api)
    conv = await api.feedback(user)
    r = await api.http.post(
        f"/v1/client/conversations/{conv['id']}/messages", json=payload, headers=user
    )
    assert_validation(r, field)
    assert await message_ids(api, user, conv["id"]) == [conv["last_message"]["id"]]
    r = await api.http.get(f"/v1/client/conversations/{conv['id']}", headers=user)
    assert r.json()["last_message"]["id"] == conv["last_message"]["id"]


async def test_location_only_message_is_accepted(api: Api) -> None:
    _, user = await unlimited_user(api)
    conv = await api.feedback(user)
    r = await api.http.post(
        f"/v1/client/conversations/{conv['id']}/messages",
        json={"location": {**LOC, "accuracy_m": 5}},
        headers=user,
    )
    assert r.status_code == 201, r.text
    assert r.json()["body"] is None
    assert r.json()["location"]["latitude"] == LOC["latitude"]
    assert len(await message_ids(api, user, conv["id"])) == 2


async def test_agent_reply_without_body_is_422(api: Api) -> None:
    app, user = await unlimited_user(api)
    _, agent = await api.create_agent(app)
    conv = await api.feedback(user)
    for payload in ({}, {"body": ""}, {"body": "  "}, {"internal": True}):
        r = await api.http.post(
            f"/v1/agent/conversations/{conv['id']}/messages", json=payload, headers=agent
        )
        assert_validation(r, "body")
    r = await api.http.get(f"/v1/agent/conversations/{conv['id']}/messages", headers=agent)
    assert [m["id"] for m in r.json()["items"]] == [conv["last_message"]["id"]]


# ----- pagination parameters --------------------------------------------------------------------


async def _list_paths(api: Api) -> list[tuple[str, dict[str, str]]]:
    app, user = await unlimited_user(api)
    _, agent = await api.create_agent(app)
    conv = await api.feedback(user)
    return [
        ("/v1/client/conversations", user),
        (f"/v1/client/conversations/{conv['id']}/messages", user),
        ("/v1/agent/conversations", agent),
        (f"/v1/agent/conversations/{conv['id']}/messages", agent),
        ("/v1/admin/apps", api.admin),
        ("/v1/admin/agents", api.admin),
    ]


BAD_CURSORS = [
    pytest.param("zzz", id="garbage"),
    pytest.param("!!!!", id="not-base64"),
    pytest.param("\u00e9t\u00e9", id="non-ascii"),
    pytest.param(b64url(b'{"a": 1}'), id="wrong-shape"),
    pytest.param(b64url(b'["not a time", "also not a uuid"]'), id="wrong-types"),
    pytest.param(
        b64url(b'["2024-01-01T00:00:00", "0190f5e2-7c1a-7000-8000-000000000000"]'),
        id="naive-timestamp",
    ),
    pytest.param(
        b64url(b'["0001-01-01T00:00:00+01:00", "0190f5e2-7c1a-7000-8000-000000000000"]'),
        id="no-utc-equivalent",
    ),
]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
async def test_bad_cursor_is_400(api: Api, cursor: str) -> None:
    with capture_logs() as logs:  # a 500 here would log a traceback; keep it quiet and fast
        for path, headers in await _list_paths(api):
            r = await api.http.get(path, params={"cursor": cursor}, headers=headers)
            problem = assert_problem(r, 400, "bad_request")
            assert "cursor" in problem["detail"], (path, problem)
    assert not [e for e in logs if e.get("log_level") == "error"], logs


@pytest.mark.parametrize("limit", ["0", "101", "-1", "abc", "1.5", ""])
async def test_limit_out_of_range_is_a_4xx_problem(api: Api, limit: str) -> None:
    for path, headers in await _list_paths(api):
        r = await api.http.get(path, params={"limit": limit}, headers=headers)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        problem = assert_problem(r, r.status_code)
        assert problem["code"] in {"bad_request", "validation_failed"}
        assert "limit" in problem["detail"], (path, problem)


async def test_limit_bounds_are_inclusive(api: Api) -> None:
    for path, headers in await _list_paths(api):
        for limit in (1, 100):
            r = await api.http.get(path, params={"limit": limit}, headers=headers)
            assert r.status_code == 200, (path, limit, r.text)
            assert len(r.json()["items"]) <= limit


# ----- routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/nope",
        "/nope",
        "/v1/client/conversations/not-a-uuid",
        "/v1/agent/conversations/123/messages",
    ],
)
async def test_unknown_route_is_404_problem(api: Api, path: str) -> None:
    _, user = await unlimited_user(api)
    r = await api.http.get(path, headers=user)
    assert_problem(r, 404, "not_found")


async def test_unknown_object_is_404_problem(api: Api) -> None:
    _, user = await unlimited_user(api)
    r = await api.http.get(f"/v1/client/conversations/{uuid.uuid4()}", headers=user)
    assert_problem(r, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v1/client/unread"),
        ("PUT", "/v1/client/conversations"),
        ("POST", "/healthz"),
        ("GET", "/v1/client/sessions"),
    ],
)
async def test_wrong_method_is_405_problem(api: Api, method: str, path: str) -> None:
    _, user = await unlimited_user(api)
    r = await api.http.request(method, path, headers=user)
    problem = assert_problem(r, 405)
    assert problem["code"] != "internal_error"
    allow = {m.strip().upper() for m in r.headers.get("allow", "").split(",") if m.strip()}
    assert allow, "a 405 names the allowed methods (RFC 9110)"
    assert method not in allow


# ----- X-Request-Id ----------------------------------------------------------------------------

Send = Callable[[Api, dict[str, str], dict[str, str]], Awaitable[httpx.Response]]


async def _ok(api: Api, user: dict[str, str], h: dict[str, str]) -> httpx.Response:
    return await api.http.get("/v1/client/unread", headers={**user, **h})


async def _created(api: Api, user: dict[str, str], h: dict[str, str]) -> httpx.Response:
    return await api.http.post(
        "/v1/client/conversations", json={"body": "x"}, headers={**user, **h}
    )


async def _healthz(api: Api, user: dict[str, str], h: dict[str, str]) -> httpx.Response:
    return await api.http.get("/healthz", headers=h)


async def _malformed(api: Api, user: dict[str, str], h: dict[str, str]) -> httpx.Response:
    headers = {**user, **h, "Content-Type": "application/json"}
    return await api.http.post("/v1/client/conversations", content=b"{", headers=headers)


async def _unauthenticated(api: Api, user: dict[str, str], h: dict[str, str]) -> httpx.Response:
    return await api.http.get("/v1/client/unread", headers=h)


async def _invalid(api: Api, user: dict[str, str], h: dict[str, str]) -> httpx.Response:
    return await api.http.post("/v1/client/conversations", json={"body": 1}, headers={**user, **h})


async def _too_large(api: Api, user: dict[str, str], h: dict[str, str]) -> httpx.Response:
    content = b'{"body": "' + b"x" * (1024 * 1024 + 1) + b'"}'
    headers = {**user, **h, "Content-Type": "application/json"}
    return await api.http.post("/v1/client/conversations", content=content, headers=headers)


async def _missing_object(api: Api, user: dict[str, str], h: dict[str, str]) -> httpx.Response:
    return await api.http.get(f"/v1/client/conversations/{uuid.uuid4()}", headers={**user, **h})


async def _unknown_route(api: Api, user: dict[str, str], h: dict[str, str]) -> httpx.Response:
    return await api.http.get("/v1/nope", headers={**user, **h})


async def _wrong_method(api: Api, user: dict[str, str], h: dict[str, str]) -> httpx.Response:
    return await api.http.delete("/v1/client/unread", headers={**user, **h})


REQUESTS: list[Any] = [
    pytest.param(_ok, 200, id="200"),
    pytest.param(_created, 201, id="201"),
    pytest.param(_healthz, 200, id="healthz"),
    pytest.param(_malformed, 400, id="400-malformed"),
    pytest.param(_unauthenticated, 401, id="401"),
    pytest.param(_missing_object, 404, id="404-object"),
    pytest.param(_too_large, 413, id="413"),
    pytest.param(_invalid, 422, id="422"),
    pytest.param(_unknown_route, 404, id="404-route"),
    pytest.param(_wrong_method, 405, id="405"),
]


def _check_request_id(r: httpx.Response, status: int, expected: str | None) -> str:
    assert r.status_code == status, r.text
    rid: str | None = r.headers.get("x-request-id")
    assert rid, f"{status} response lacks X-Request-Id"
    assert VALID_REQUEST_ID.match(rid), rid
    if expected is not None:
        assert rid == expected
    if status >= 400:
        problem = assert_problem(r, status)
        assert problem.get("request_id") == rid, problem
    return rid


@pytest.mark.parametrize(("send", "status"), REQUESTS)
async def test_request_id_on_every_response(api: Api, send: Send, status: int) -> None:
    _, user = await unlimited_user(api)
    # A valid incoming id is echoed.
    incoming = f"req-{uuid.uuid4().hex}:1.a_b"
    _check_request_id(await send(api, user, {"X-Request-Id": incoming}), status, incoming)
    # Without one, each response gets a fresh id.
    first = _check_request_id(await send(api, user, {}), status, None)
    second = _check_request_id(await send(api, user, {}), status, None)
    assert first != second
    # An invalid one is replaced, never echoed.
    for bad in ("a" * 300, "has spaces", "semi;colon", "<script>", "x/y"):
        rid = _check_request_id(await send(api, user, {"X-Request-Id": bad}), status, None)
        assert rid != bad


async def test_request_id_length_and_charset(api: Api) -> None:
    for incoming, echoed in (("r" * 128, True), ("r" * 129, False), ("", False)):
        r = await api.http.get("/healthz", headers={"X-Request-Id": incoming})
        assert r.status_code == 200
        assert (r.headers["x-request-id"] == incoming) is echoed
        assert VALID_REQUEST_ID.match(r.headers["x-request-id"])
    # Bytes that are not ASCII are never reflected into a header.
    r = await api.http.get("/healthz", headers=[(b"X-Request-Id", b"caf\xc3\xa9\r\n")])
    assert r.status_code == 200
    assert VALID_REQUEST_ID.match(r.headers["x-request-id"])


# ----- 500 -------------------------------------------------------------------------------------

SECRET_TEXT = "tbs_LEAKED_SECRET_d00d"


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(RuntimeError(f"boom {SECRET_TEXT} at /srv/tellback/app.py"), id="runtime"),
        pytest.param(KeyError(SECRET_TEXT), id="keyerror"),
        pytest.param(
            sqlalchemy.exc.ProgrammingError(
                f"SELECT token_hash FROM admin_tokens WHERE x = '{SECRET_TEXT}'",  # noqa: S608
                {},
                Exception(f'relation "{SECRET_TEXT}" does not exist'),
            ),
            id="sql",
        ),
    ],
)
async def test_500_never_echoes_exception_text(
    api: Api, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    _, user = await unlimited_user(api)

    async def broken(self: ConversationService, *args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(ConversationService, "client_unread", broken)
    with capture_logs() as logs:
        r = await api.http.get("/v1/client/unread", headers={**user, "X-Request-Id": "r-500"})
    problem = assert_problem(r, 500, "internal_error")
    assert r.headers.get("x-request-id") == "r-500"
    assert problem.get("request_id") == "r-500"
    for leak in (SECRET_TEXT, "SELECT", "Traceback", "boom", type(exc).__name__, "File ", ".py"):
        assert leak not in r.text, f"{leak!r} leaked into {r.text}"
    assert "errors" not in problem
    # The operator still gets the details in the log.
    assert any(e.get("log_level") == "error" for e in logs), logs
