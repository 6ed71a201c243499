"""Admin API: authentication, apps and their settings, key rotation, agents, the CLI token."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.pool import QueuePool

from tellback_server.asgi import create_app
from tellback_server.db.models import AdminToken, App
from tellback_server.jobs.registry import JobRegistry
from tellback_server.settings import Settings
from tests.server.conftest import SECRET, Api, AppInfo, identity_token, lifespan

PROBLEM_JSON = "application/problem+json"
REPO = Path(__file__).resolve().parents[2]


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["code"] == code, body
    return body


async def open_session(api: Api, app_key: str) -> httpx.Response:
    return await api.http.post(
        "/v1/client/sessions",
        json={"app_key": app_key, "installation_id": uuid.uuid4().hex},
    )


async def get_app(api: Api, app_id: str) -> dict[str, Any]:
    r = await api.http.get(f"/v1/admin/apps/{app_id}", headers=api.admin)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def rotate(api: Api, app: AppInfo, **body: bool) -> dict[str, Any]:
    r = await api.http.post(f"/v1/admin/apps/{app.id}/rotate-keys", json=body, headers=api.admin)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def walk(api: Api, path: str, limit: int) -> list[list[str]]:
    """Pages of ids, following next_cursor to the end."""
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        r = await api.http.get(path, params=params, headers=api.admin)
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append([item["id"] for item in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "pagination does not end"


# --- authentication -----------------------------------------------------------------------

ADMIN_ENDPOINTS = [
    ("GET", "/v1/admin/apps"),
    ("POST", "/v1/admin/apps"),
    ("GET", "/v1/admin/apps/{app}"),
    ("PATCH", "/v1/admin/apps/{app}"),
    ("POST", "/v1/admin/apps/{app}/rotate-keys"),
    ("DELETE", "/v1/admin/apps/{app}/identity-secrets/{kid}"),
    ("GET", "/v1/admin/agents"),
    ("POST", "/v1/admin/agents"),
    ("GET", "/v1/admin/agents/{agent}"),
    ("PATCH", "/v1/admin/agents/{agent}"),
    ("POST", "/v1/admin/agents/{agent}/rotate-token"),
]


async def test_admin_endpoints_require_a_valid_admin_token(api: Api) -> None:
    app = await api.create_app()
    agent_id, agent_headers = await api.create_agent(app)
    session = await api.session(app)
    before = await get_app(api, app.id)
    bodies: dict[str, Any] = {
        "/v1/admin/apps": {"name": "Sneaky"},
        "/v1/admin/apps/{app}": {"name": "Hijacked"},
        "/v1/admin/agents": {"name": "Sneaky"},
        "/v1/admin/agents/{agent}": {"name": "Hijacked", "disabled": True},
    }
    bad_credentials: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer tba_not-a-real-admin-token"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {api.admin_token}"},
        {"Authorization": api.admin_token},
        {"Authorization": f"Bearer {api.admin_token}x"},
        agent_headers,
        api.bearer(session["session_token"]),
        api.bearer(app.app_key),
        api.bearer(app.identity_secret),
    ]
    for method, template in ADMIN_ENDPOINTS:
        path = template.format(app=app.id, kid=app.identity_kid, agent=agent_id)
        body = bodies.get(template)
        for headers in bad_credentials:
            r = await asyncio.wait_for(
                api.http.request(method, path, json=body, headers=headers), 15
            )
            assert r.status_code == 401, (method, path, headers, r.text)
            assert_problem(r, 401, "unauthenticated")
            assert "x-request-id" in r.headers
            # Refused requests can leave their transaction to the garbage collector (see
            # test_refused_admin_request_releases_the_database); collect so this test
            # checks authentication only.
            gc.collect()
    # Nothing changed.
    after = await get_app(api, app.id)
    assert after == before
    r = await api.http.get("/v1/admin/apps", headers=api.admin)
    assert [a["id"] for a in r.json()["items"]] == [app.id]
    r = await api.http.get("/v1/agent/me", headers=agent_headers)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Ada"


async def test_admin_token_is_not_an_agent_or_session_token(api: Api) -> None:
    for path in ("/v1/agent/me", "/v1/agent/conversations", "/v1/client/me"):
        assert_problem(await api.http.get(path, headers=api.admin), 401, "unauthenticated")


# --- apps ---------------------------------------------------------------------------------


async def test_create_app_shows_identity_secret_once(api: Api) -> None:
    r = await api.http.post(
        "/v1/admin/apps",
        json={"name": "Shop", "bundle_id": "com.example.shop", "android_package": "com.ex.shop"},
        headers=api.admin,
    )
    assert r.status_code == 201, r.text
    created = r.json()
    secret, kid, app_key = created["identity_secret"], created["identity_kid"], created["app_key"]
    assert created["name"] == "Shop"
    assert created["bundle_id"] == "com.example.shop"
    assert created["android_package"] == "com.ex.shop"
    assert isinstance(secret, str)
    assert len(secret) >= 32
    assert isinstance(app_key, str)
    assert app_key
    assert created["identity_kids"] == [kid]
    assert created["previous_app_key"] is None
    assert created["settings"]["identity_mode"] == "optional"

    r = await api.http.get(f"/v1/admin/apps/{created['id']}", headers=api.admin)
    assert r.status_code == 200, r.text
    got = r.json()
    assert "identity_secret" not in got
    assert secret not in r.text
    assert got["app_key"] == app_key
    assert got["identity_kids"] == [kid]
    assert got["name"] == "Shop"

    r = await api.http.get("/v1/admin/apps", headers=api.admin)
    assert r.status_code == 200, r.text
    assert secret not in r.text
    (listed,) = r.json()["items"]
    assert "identity_secret" not in listed
    assert listed["id"] == created["id"]
    assert listed["app_key"] == app_key
    assert listed["identity_kids"] == [kid]

    # The secret shown is the one the server verifies identity tokens with.
    r = await api.http.post(
        "/v1/client/sessions",
        json={
            "app_key": app_key,
            "installation_id": uuid.uuid4().hex,
            "user_token": identity_token(secret, "u1", kid=kid),
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["user"]["external_id"] == "u1"


async def test_each_app_has_its_own_keys(api: Api) -> None:
    a = await api.create_app("A")
    b = await api.create_app("B")
    assert a.id != b.id
    assert a.app_key != b.app_key
    assert a.identity_secret != b.identity_secret


async def test_get_unknown_app_is_not_found(api: Api) -> None:
    missing = uuid.uuid4()
    assert_problem(
        await api.http.get(f"/v1/admin/apps/{missing}", headers=api.admin), 404, "not_found"
    )
    r = await api.http.patch(f"/v1/admin/apps/{missing}", json={"name": "X"}, headers=api.admin)
    assert_problem(r, 404, "not_found")
    r = await api.http.post(f"/v1/admin/apps/{missing}/rotate-keys", json={}, headers=api.admin)
    assert_problem(r, 404, "not_found")


async def test_list_apps_pagination_walks_all_without_repeats(api: Api) -> None:
    created = [(await api.create_app(f"App {i}")).id for i in range(5)]
    pages = await walk(api, "/v1/admin/apps", limit=1)
    assert all(len(page) == 1 for page in pages), pages
    ids = [i for page in pages for i in page]
    assert len(ids) == len(set(ids)), ids
    assert ids == created  # oldest first
    pages = await walk(api, "/v1/admin/apps", limit=2)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for page in pages for i in page] == created
    r = await api.http.get("/v1/admin/apps", params={"limit": 5}, headers=api.admin)
    assert r.json()["next_cursor"] is None
    assert [a["id"] for a in r.json()["items"]] == created


async def test_list_apps_pagination_with_equal_timestamps(api: Api) -> None:
    created = {(await api.create_app(f"Twin {i}")).id for i in range(4)}
    same = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
    async with api.state.db.session(write=True) as db:
        await db.execute(update(App).values(created_at=same))
    pages = await walk(api, "/v1/admin/apps", limit=1)
    ids = [i for page in pages for i in page]
    assert len(ids) == len(set(ids)), ids
    assert set(ids) == created


async def test_list_apps_bad_cursor(api: Api) -> None:
    await api.create_app()
    r = await api.http.get("/v1/admin/apps", params={"cursor": "!!garbage!!"}, headers=api.admin)
    assert_problem(r, 400, "bad_request")


async def test_patch_settings_is_partial(api: Api) -> None:
    fields = [
        {"key": "order_id", "type": "string", "required": True},
        {"key": "plan", "type": "select", "options": ["free", "pro"]},
    ]
    app = await api.create_app(
        categories=["Bug", "Idea"],
        custom_fields=fields,
        rate_limits={"app_per_minute": 500, "user_per_minute": 20},
        keep_photo_location=True,
    )
    original = await get_app(api, app.id)
    assert original["settings"]["rate_limits"] == {"app_per_minute": 500, "user_per_minute": 20}

    r = await api.http.patch(
        f"/v1/admin/apps/{app.id}",
        json={"settings": {"categories": ["Crash"]}},
        headers=api.admin,
    )
    assert r.status_code == 200, r.text
    settings = r.json()["settings"]
    assert settings["categories"] == ["Crash"]
    for key in ("custom_fields", "rate_limits", "identity_mode", "keep_photo_location"):
        assert settings[key] == original["settings"][key], key
    assert settings["keep_photo_location"] is True

    r = await api.http.patch(
        f"/v1/admin/apps/{app.id}",
        json={"settings": {"identity_mode": "required", "content_free_push": True}},
        headers=api.admin,
    )
    assert r.status_code == 200, r.text
    settings = r.json()["settings"]
    assert settings["identity_mode"] == "required"
    assert settings["content_free_push"] is True
    assert settings["categories"] == ["Crash"]
    assert settings["custom_fields"] == original["settings"]["custom_fields"]
    assert settings["rate_limits"] == {"app_per_minute": 500, "user_per_minute": 20}

    # Renaming leaves settings alone; GET shows what PATCH returned.
    r = await api.http.patch(
        f"/v1/admin/apps/{app.id}", json={"name": "Renamed"}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    got = await get_app(api, app.id)
    assert got["name"] == "Renamed"
    assert got["settings"] == settings
    assert got["app_key"] == app.app_key
    assert got["identity_kids"] == [app.identity_kid]


INVALID_SETTINGS: dict[str, dict[str, Any]] = {
    "duplicate_field_keys": {
        "custom_fields": [{"key": "order", "type": "string"}, {"key": "order", "type": "number"}]
    },
    "select_without_options": {"custom_fields": [{"key": "plan", "type": "select"}]},
    "multiselect_empty_options": {
        "custom_fields": [{"key": "tags", "type": "multiselect", "options": []}]
    },
    "unknown_field_type": {"custom_fields": [{"key": "when", "type": "date"}]},
    "bad_field_key": {"custom_fields": [{"key": "Order Id", "type": "string"}]},
    "unknown_identity_mode": {"identity_mode": "sometimes"},
    "negative_app_rate_limit": {"rate_limits": {"app_per_minute": -1}},
    "negative_user_rate_limit": {"rate_limits": {"user_per_minute": -5}},
    "unknown_rate_limit": {"rate_limits": {"per_second": 5}},
    "unknown_settings_field": {"dark_mode": True},
    "duplicate_categories": {"categories": ["Bug", "Bug"]},
    "empty_category": {"categories": [""]},
}


@pytest.mark.parametrize("case", list(INVALID_SETTINGS))
async def test_invalid_settings_are_refused(api: Api, case: str) -> None:
    settings = INVALID_SETTINGS[case]
    r = await api.http.post(
        "/v1/admin/apps", json={"name": "Bad", "settings": settings}, headers=api.admin
    )
    assert_problem(r, 422, "validation_failed")
    r = await api.http.get("/v1/admin/apps", headers=api.admin)
    assert r.json()["items"] == []  # nothing was created

    app = await api.create_app(categories=["Keep"])
    before = await get_app(api, app.id)
    r = await api.http.patch(
        f"/v1/admin/apps/{app.id}", json={"settings": settings}, headers=api.admin
    )
    body = assert_problem(r, 422, "validation_failed")
    assert body.get("errors") or body.get("detail")
    assert (await get_app(api, app.id))["settings"] == before["settings"]


async def test_invalid_app_bodies_are_refused(api: Api) -> None:
    for body in ({}, {"name": ""}, {"name": "X", "unknown": 1}, {"name": "x" * 201}):
        r = await api.http.post("/v1/admin/apps", json=body, headers=api.admin)
        assert_problem(r, 422, "validation_failed")
    r = await api.http.post(
        "/v1/admin/apps",
        content=b'{"name": ',
        headers={**api.admin, "Content-Type": "application/json"},
    )
    assert_problem(r, 400, "bad_request")


# --- key rotation -------------------------------------------------------------------------


async def test_rotate_app_key_keeps_previous_until_revoked(api: Api) -> None:
    app = await api.create_app()
    old_key = app.app_key
    rotated = await rotate(api, app, app_key=True, identity_secret=False)
    new_key = rotated["app_key"]
    assert new_key != old_key
    assert rotated["previous_app_key"] == old_key
    assert rotated["identity_secret"] is None
    assert rotated["identity_kids"] == [app.identity_kid]
    got = await get_app(api, app.id)
    assert got["app_key"] == new_key
    assert got["previous_app_key"] == old_key

    for key in (old_key, new_key):
        r = await open_session(api, key)
        assert r.status_code == 201, r.text

    revoked = await rotate(api, app, identity_secret=False, revoke_previous=True)
    assert revoked["app_key"] == new_key
    assert revoked["previous_app_key"] is None
    assert revoked["identity_kids"] == [app.identity_kid]
    assert_problem(await open_session(api, old_key), 401, "unauthenticated")
    r = await open_session(api, new_key)
    assert r.status_code == 201, r.text


async def test_rotate_app_key_with_revoke_previous_at_once(api: Api) -> None:
    app = await api.create_app()
    rotated = await rotate(api, app, app_key=True, identity_secret=False, revoke_previous=True)
    assert rotated["previous_app_key"] is None
    assert_problem(await open_session(api, app.app_key), 401, "unauthenticated")
    r = await open_session(api, rotated["app_key"])
    assert r.status_code == 201, r.text


async def test_rotate_keys_default_rotates_identity_secret_only(api: Api) -> None:
    app = await api.create_app()
    r = await api.http.post(f"/v1/admin/apps/{app.id}/rotate-keys", headers=api.admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["app_key"] == app.app_key
    assert body["previous_app_key"] is None
    assert isinstance(body["identity_secret"], str)
    assert body["identity_secret"] != app.identity_secret
    assert body["identity_kids"] == [app.identity_kid, body["identity_kid"]]
    got = await get_app(api, app.id)
    assert "identity_secret" not in got
    assert body["identity_secret"] not in str(got)
    assert got["identity_kids"] == [app.identity_kid, body["identity_kid"]]
    r = await api.http.post(
        f"/v1/admin/apps/{app.id}/rotate-keys", json={"bogus": True}, headers=api.admin
    )
    assert_problem(r, 422, "validation_failed")


async def test_revoke_identity_secrets(api: Api) -> None:
    app = await api.create_app()
    other = await api.create_app("Other")
    # The last (only) secret cannot be revoked.
    r = await api.http.delete(
        f"/v1/admin/apps/{app.id}/identity-secrets/{app.identity_kid}", headers=api.admin
    )
    assert_problem(r, 422, "validation_failed")
    assert (await get_app(api, app.id))["identity_kids"] == [app.identity_kid]

    rotated = await rotate(api, app)
    kid2 = rotated["identity_kid"]
    # Unknown kids and another app's kid are not found.
    r = await api.http.delete(f"/v1/admin/apps/{app.id}/identity-secrets/k_nope", headers=api.admin)
    assert_problem(r, 404, "not_found")
    r = await api.http.delete(
        f"/v1/admin/apps/{app.id}/identity-secrets/{other.identity_kid}", headers=api.admin
    )
    assert_problem(r, 404, "not_found")
    assert (await get_app(api, other.id))["identity_kids"] == [other.identity_kid]

    r = await api.http.delete(
        f"/v1/admin/apps/{app.id}/identity-secrets/{app.identity_kid}", headers=api.admin
    )
    assert r.status_code == 204, r.text
    assert (await get_app(api, app.id))["identity_kids"] == [kid2]
    # Revoking it again: it is no longer an active secret.
    r = await api.http.delete(
        f"/v1/admin/apps/{app.id}/identity-secrets/{app.identity_kid}", headers=api.admin
    )
    assert_problem(r, 404, "not_found")
    # Now kid2 is the last one.
    r = await api.http.delete(f"/v1/admin/apps/{app.id}/identity-secrets/{kid2}", headers=api.admin)
    assert_problem(r, 422, "validation_failed")
    assert (await get_app(api, app.id))["identity_kids"] == [kid2]
    r = await api.http.delete(
        f"/v1/admin/apps/{uuid.uuid4()}/identity-secrets/{kid2}", headers=api.admin
    )
    assert_problem(r, 404, "not_found")


# --- agents -------------------------------------------------------------------------------


async def create_agent_raw(api: Api, **body: Any) -> httpx.Response:
    return await api.http.post("/v1/admin/agents", json=body, headers=api.admin)


async def agent_conversation_ids(api: Api, headers: dict[str, str]) -> set[str]:
    r = await api.http.get("/v1/agent/conversations", headers=headers)
    assert r.status_code == 200, r.text
    return {c["id"] for c in r.json()["items"]}


async def test_create_agent_shows_token_once(api: Api) -> None:
    app = await api.create_app()
    r = await create_agent_raw(api, name="Lin", email="lin@example.com", app_ids=[app.id])
    assert r.status_code == 201, r.text
    created = r.json()
    token = created["token"]
    assert isinstance(token, str)
    assert len(token) >= 32
    assert created["name"] == "Lin"
    assert created["email"] == "lin@example.com"
    assert created["app_ids"] == [app.id]
    assert created["disabled"] is False

    r = await api.http.get(f"/v1/admin/agents/{created['id']}", headers=api.admin)
    assert r.status_code == 200, r.text
    assert "token" not in r.json()
    assert token not in r.text
    assert r.json()["app_ids"] == [app.id]
    r = await api.http.get("/v1/admin/agents", headers=api.admin)
    assert r.status_code == 200, r.text
    assert token not in r.text
    (listed,) = r.json()["items"]
    assert listed["id"] == created["id"]
    assert "token" not in listed

    r = await api.http.get("/v1/agent/me", headers=api.bearer(token))
    assert r.status_code == 200, r.text
    assert r.json() == {"id": created["id"], "name": "Lin", "app_ids": [app.id]}


async def test_list_agents_pagination(api: Api) -> None:
    created = [(await create_agent_raw(api, name=f"Agent {i}")).json()["id"] for i in range(4)]
    pages = await walk(api, "/v1/admin/agents", limit=1)
    assert all(len(p) == 1 for p in pages)
    assert [i for p in pages for i in p] == created


async def test_agent_app_ids_decide_what_it_sees(api: Api) -> None:
    app_a = await api.create_app("A")
    app_b = await api.create_app("B")
    conv_a = await api.feedback(await api.user_headers(app_a), body="in A")
    conv_b = await api.feedback(await api.user_headers(app_b), body="in B")
    agent_id, agent = await api.create_agent(app_a)

    assert await agent_conversation_ids(api, agent) == {conv_a["id"]}
    r = await api.http.get(f"/v1/agent/conversations/{conv_b['id']}", headers=agent)
    assert_problem(r, 404, "not_found")
    r = await api.http.get(f"/v1/agent/conversations/{conv_a['id']}", headers=agent)
    assert r.status_code == 200, r.text

    r = await api.http.patch(
        f"/v1/admin/agents/{agent_id}", json={"app_ids": [app_b.id]}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["app_ids"] == [app_b.id]
    assert r.json()["name"] == "Ada"  # untouched
    assert await agent_conversation_ids(api, agent) == {conv_b["id"]}
    r = await api.http.get(f"/v1/agent/conversations/{conv_a['id']}", headers=agent)
    assert_problem(r, 404, "not_found")
    r = await api.http.post(
        f"/v1/agent/conversations/{conv_a['id']}/messages",
        json={"body": "Not my app any more"},
        headers=agent,
    )
    assert_problem(r, 404, "not_found")
    r = await api.http.get("/v1/agent/me", headers=agent)
    assert r.json()["app_ids"] == [app_b.id]

    r = await api.http.patch(
        f"/v1/admin/agents/{agent_id}",
        json={"app_ids": [app_a.id, app_b.id]},
        headers=api.admin,
    )
    assert r.status_code == 200, r.text
    assert sorted(r.json()["app_ids"]) == sorted([app_a.id, app_b.id])
    assert await agent_conversation_ids(api, agent) == {conv_a["id"], conv_b["id"]}

    r = await api.http.patch(
        f"/v1/admin/agents/{agent_id}", json={"app_ids": []}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["app_ids"] == []
    assert await agent_conversation_ids(api, agent) == set()


async def test_disabled_agent_is_unauthenticated(api: Api) -> None:
    app = await api.create_app()
    agent_id, agent = await api.create_agent(app)
    # Checked once, so the process has the agent cached (http/auth_cache.py) ...
    assert (await api.http.get("/v1/agent/me", headers=agent)).status_code == 200
    # ... and disabling it empties that cache when it commits.
    r = await api.http.patch(
        f"/v1/admin/agents/{agent_id}", json={"disabled": True}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["disabled"] is True
    for path in ("/v1/agent/me", "/v1/agent/conversations"):
        assert_problem(await api.http.get(path, headers=agent), 401, "unauthenticated")
    r = await api.http.get(f"/v1/admin/agents/{agent_id}", headers=api.admin)
    assert r.json()["disabled"] is True
    # Renaming a disabled agent keeps it disabled.
    r = await api.http.patch(
        f"/v1/admin/agents/{agent_id}", json={"name": "Still off"}, headers=api.admin
    )
    assert r.json()["disabled"] is True
    assert_problem(await api.http.get("/v1/agent/me", headers=agent), 401, "unauthenticated")
    r = await api.http.patch(
        f"/v1/admin/agents/{agent_id}", json={"disabled": False}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["disabled"] is False
    r = await api.http.get("/v1/agent/me", headers=agent)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Still off"


async def test_rotate_agent_token(api: Api) -> None:
    app = await api.create_app()
    agent_id, old = await api.create_agent(app)
    assert (await api.http.get("/v1/agent/me", headers=old)).status_code == 200  # (cached)
    r = await api.http.post(f"/v1/admin/agents/{agent_id}/rotate-token", headers=api.admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == agent_id
    assert body["app_ids"] == [app.id]
    new = api.bearer(body["token"])
    assert new != old
    assert_problem(await api.http.get("/v1/agent/me", headers=old), 401, "unauthenticated")
    r = await api.http.get("/v1/agent/me", headers=new)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == agent_id
    r = await api.http.post(f"/v1/admin/agents/{uuid.uuid4()}/rotate-token", headers=api.admin)
    assert_problem(r, 404, "not_found")


async def test_unknown_app_ids_are_refused(api: Api) -> None:
    app = await api.create_app()
    missing = str(uuid.uuid4())
    r = await create_agent_raw(api, name="Ghost", app_ids=[app.id, missing])
    body = assert_problem(r, 422, "validation_failed")
    assert missing in r.text
    assert body["errors"][0]["field"] == "app_ids"
    r = await api.http.get("/v1/admin/agents", headers=api.admin)
    assert r.json()["items"] == []  # the refused agent was not created

    agent_id, agent = await api.create_agent(app)
    r = await api.http.patch(
        f"/v1/admin/agents/{agent_id}", json={"app_ids": [missing]}, headers=api.admin
    )
    assert_problem(r, 422, "validation_failed")
    r = await api.http.get(f"/v1/admin/agents/{agent_id}", headers=api.admin)
    assert r.json()["app_ids"] == [app.id]
    r = await api.http.get("/v1/agent/me", headers=agent)
    assert r.json()["app_ids"] == [app.id]

    for bad in (["not-a-uuid"], "nope"):
        r = await create_agent_raw(api, name="Bad", app_ids=bad)
        assert_problem(r, 422, "validation_failed")


async def test_invalid_agent_bodies_are_refused(api: Api) -> None:
    for body in (
        {"name": ""},
        {"name": "X", "email": "not-an-email"},
        {"name": "X", "role": "owner"},
        {"email": "x@example.com"},
    ):
        r = await create_agent_raw(api, **body)
        assert_problem(r, 422, "validation_failed")
    r = await api.http.get("/v1/admin/agents", headers=api.admin)
    assert r.json()["items"] == []
    agent_id, _ = await api.create_agent()
    r = await api.http.patch(
        f"/v1/admin/agents/{agent_id}", json={"token": "tbg_mine"}, headers=api.admin
    )
    assert_problem(r, 422, "validation_failed")
    r = await api.http.patch(
        f"/v1/admin/agents/{uuid.uuid4()}", json={"name": "X"}, headers=api.admin
    )
    assert_problem(r, 404, "not_found")


# --- refused requests must not hold the database ------------------------------------------


def checked_out_connections(api: Api) -> int:
    pool = api.state.db.engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


REFUSED_ADMIN_REQUESTS = {
    "list_apps": ("GET", "/v1/admin/apps", "forged_admin"),
    "create_app": ("POST", "/v1/admin/apps", "forged_admin"),
    "patch_app": ("PATCH", "/v1/admin/apps/{app}", "forged_admin"),
    "list_agents": ("GET", "/v1/admin/agents", "forged_admin"),
    "create_agent": ("POST", "/v1/admin/agents", "forged_admin"),
    "create_agent_no_header": ("POST", "/v1/admin/agents", "none"),
    "patch_agent": ("PATCH", "/v1/admin/agents/{agent}", "forged_admin"),
    "rotate_agent_token": ("POST", "/v1/admin/agents/{agent}/rotate-token", "forged_admin"),
    "agent_me_forged": ("GET", "/v1/agent/me", "forged_agent"),
    "agent_inbox_forged": ("GET", "/v1/agent/conversations", "forged_agent"),
    "agent_inbox_disabled": ("GET", "/v1/agent/conversations", "disabled_agent"),
}


@pytest.mark.parametrize("case", list(REFUSED_ADMIN_REQUESTS))
async def test_refused_admin_request_releases_the_database(api: Api, case: str) -> None:
    """A 401 must end the request's transaction when the response is sent.

    The garbage collector is paused so that cleanup which only happens when it
    collects a reference cycle (at some later time, or never under low load) shows.
    On SQLite a leaked write transaction keeps the process's writer lock, so every
    later write waits for it.
    """
    method, template, kind = REFUSED_ADMIN_REQUESTS[case]
    app = await api.create_app()
    agent_id, agent = await api.create_agent(app)
    headers: dict[str, str] = {}
    if kind == "forged_admin":
        headers = api.bearer("tba_forged-admin-token")
    elif kind == "forged_agent":
        headers = api.bearer("tbg_forged-agent-token")
    elif kind == "disabled_agent":
        r = await api.http.patch(
            f"/v1/admin/agents/{agent_id}", json={"disabled": True}, headers=api.admin
        )
        assert r.status_code == 200, r.text
        headers = agent
    path = template.format(app=app.id, agent=agent_id)
    body = None if method == "GET" else {"name": "Refused"}
    gc.collect()
    await asyncio.sleep(0.05)
    assert checked_out_connections(api) == 0
    gc.disable()
    try:
        for attempt in range(2):
            try:
                r = await asyncio.wait_for(
                    api.http.request(method, path, json=body, headers=headers), 10
                )
            except TimeoutError:
                pytest.fail(f"refused request #{attempt + 1} hangs: the first kept the write lock")
            assert_problem(r, 401, "unauthenticated")
        await asyncio.sleep(0.05)  # let finalizers that were already scheduled run
        held = checked_out_connections(api)
        assert held == 0, f"{held} database connection(s) still held after {method} {path} -> 401"
        try:
            r = await asyncio.wait_for(
                api.http.post("/v1/admin/apps", json={"name": "probe"}, headers=api.admin), 10
            )
        except TimeoutError:
            pytest.fail(f"a write hangs after {method} {path} -> 401: the write lock leaked")
        assert r.status_code == 201, r.text
    finally:
        gc.enable()
        gc.collect()  # whatever leaked is finalized here, not in a later test
        await asyncio.sleep(0.1)
    r = await api.http.get(f"/v1/admin/agents/{agent_id}", headers=api.admin)
    assert r.json()["name"] == "Ada"


# --- the CLI ------------------------------------------------------------------------------


async def run_create_token(data_dir: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELLBACK_")}
    env["TELLBACK_DATA_DIR"] = str(data_dir)
    proc = await asyncio.create_subprocess_exec(
        "uv",
        "run",
        "tellback",
        "admin",
        "create-token",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_create_token(tmp_path: Path) -> None:
    data_dir = tmp_path / "cli-data"
    code, out, err = await run_create_token(data_dir)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines, (out, err)
    token = lines[-1].strip()
    assert token == lines[-1]
    assert " " not in token
    assert len(token) >= 32
    assert (data_dir / "tellback.db").is_file()
    code, out2, err2 = await run_create_token(data_dir)
    assert code == 0, err2
    second = out2.strip().splitlines()[-1]
    assert second != token

    settings = Settings(
        data_dir=data_dir,
        database_url=f"sqlite+aiosqlite:///{data_dir / 'tellback.db'}",
        secret_key=SECRET,
    )
    app = create_app(settings, registry=JobRegistry())
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://tellback.test") as client,
    ):
        for t in (token, second):
            r = await client.get("/v1/admin/apps", headers={"Authorization": f"Bearer {t}"})
            assert r.status_code == 200, r.text
            assert r.json() == {"items": [], "next_cursor": None}
        r = await client.post(
            "/v1/admin/apps",
            json={"name": "From CLI"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 201, r.text
        r = await client.get("/v1/admin/apps", headers={"Authorization": f"Bearer {token}x"})
        assert_problem(r, 401, "unauthenticated")


async def test_an_admin_tokens_last_use_is_kept_to_the_minute(api: Api) -> None:
    """What `tellback admin list-tokens` shows as "last used" (nothing wrote it): set on
    use, and written again only once the minute is past, so a busy operator script
    does not turn every admin request into a write."""

    async def last_used() -> dt.datetime | None:
        async with api.state.db.session(write=False) as db:
            return await db.scalar(select(AdminToken.last_used_at))

    assert await last_used() is None
    assert (await api.http.get("/v1/admin/apps", headers=api.admin)).status_code == 200
    first = await last_used()
    assert first is not None
    assert abs((dt.datetime.now(dt.UTC) - first).total_seconds()) < 60
    assert (await api.http.get("/v1/admin/apps", headers=api.admin)).status_code == 200
    assert await last_used() == first  # within the minute: not written again
    async with api.state.db.session(write=True) as db:
        an_hour_ago = first - dt.timedelta(hours=1)
        await db.execute(update(AdminToken).values(last_used_at=an_hour_ago))
    assert (await api.http.get("/v1/admin/apps", headers=api.admin)).status_code == 200
    assert (await last_used() or an_hour_ago) > first - dt.timedelta(seconds=1)
