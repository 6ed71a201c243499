"""Isolation: no caller reaches another end user's, another app's or an unknown object.

API.md (Errors): 404 `not_found` "also for any object of another app or another
end user — never leak existence". Every case below checks the status, the
problem document, that the answer is indistinguishable from the one for a
random id, and that nothing changed, as seen by the rightful owners afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.pool import QueuePool

from tests.server.conftest import Api, AppInfo, identity_token

PROBLEM_JSON = "application/problem+json"


# ----- the world every case runs in ---------------------------------------------------------


@dataclass
class Party:
    """An end user with one conversation (user message, agent reply, user message)."""

    headers: dict[str, str]
    conversation_id: str
    message_ids: list[str]
    marker: str


@dataclass
class World:
    app_a: AppInfo
    app_b: AppInfo
    # The caller in client cases; its conversation is in app A.
    owner: Party
    # Another end user of app A.
    neighbour: Party
    # An end user of app B.
    stranger: Party
    agent_a_id: str
    agent_a: dict[str, str]
    agent_b_id: str
    agent_b: dict[str, str]
    agent_none_id: str
    agent_none: dict[str, str]


async def _party(api: Api, app: AppInfo, agent: dict[str, str], marker: str) -> Party:
    headers = await api.user_headers(app)
    conv = await api.feedback(headers, body=f"first message {marker}", subject=f"subject {marker}")
    conv_id: str = conv["id"]
    r = await api.http.post(
        f"/v1/agent/conversations/{conv_id}/messages",
        json={"body": f"agent reply {marker}"},
        headers=agent,
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(
        f"/v1/client/conversations/{conv_id}/messages",
        json={"body": f"user follow-up {marker}"},
        headers=headers,
    )
    assert r.status_code == 201, r.text
    r = await api.http.get(f"/v1/client/conversations/{conv_id}/messages", headers=headers)
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in r.json()["items"]]
    assert len(ids) == 3
    return Party(headers=headers, conversation_id=conv_id, message_ids=ids, marker=marker)


async def build_world(api: Api) -> World:
    app_a = await api.create_app("App A")
    app_b = await api.create_app("App B")
    agent_a_id, agent_a = await api.create_agent(app_a, name="Agent A")
    agent_b_id, agent_b = await api.create_agent(app_b, name="Agent B")
    agent_none_id, agent_none = await api.create_agent(name="Agent without apps")
    owner = await _party(api, app_a, agent_a, "owner-a1")
    neighbour = await _party(api, app_a, agent_a, "neighbour-a2")
    stranger = await _party(api, app_b, agent_b, "stranger-b1")
    return World(
        app_a=app_a,
        app_b=app_b,
        owner=owner,
        neighbour=neighbour,
        stranger=stranger,
        agent_a_id=agent_a_id,
        agent_a=agent_a,
        agent_b_id=agent_b_id,
        agent_b=agent_b,
        agent_none_id=agent_none_id,
        agent_none=agent_none,
    )


async def _get_json(api: Api, path: str, headers: dict[str, str]) -> Any:
    r = await api.http.get(path, headers=headers)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
    return r.json()


async def snapshot(api: Api, world: World) -> dict[str, Any]:
    """Everything the rightful owners see; equal before and after means nothing changed."""
    seen: dict[str, Any] = {}
    for name, party, agent in (
        ("owner", world.owner, world.agent_a),
        ("neighbour", world.neighbour, world.agent_a),
        ("stranger", world.stranger, world.agent_b),
    ):
        cid = party.conversation_id
        seen[f"{name}.client.list"] = await _get_json(
            api, "/v1/client/conversations", party.headers
        )
        seen[f"{name}.client.get"] = await _get_json(
            api, f"/v1/client/conversations/{cid}", party.headers
        )
        seen[f"{name}.client.messages"] = await _get_json(
            api, f"/v1/client/conversations/{cid}/messages", party.headers
        )
        seen[f"{name}.client.unread"] = await _get_json(api, "/v1/client/unread", party.headers)
        seen[f"{name}.agent.get"] = await _get_json(api, f"/v1/agent/conversations/{cid}", agent)
        seen[f"{name}.agent.messages"] = await _get_json(
            api, f"/v1/agent/conversations/{cid}/messages", agent
        )
    seen["agent_a.inbox"] = await _get_json(api, "/v1/agent/conversations", world.agent_a)
    seen["agent_b.inbox"] = await _get_json(api, "/v1/agent/conversations", world.agent_b)
    seen["admin.apps"] = await _get_json(api, "/v1/admin/apps", api.admin)
    seen["admin.agents"] = await _get_json(api, "/v1/admin/agents", api.admin)
    return seen


def assert_not_found(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 404, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    assert r.headers["content-type"].split(";")[0].strip() == PROBLEM_JSON
    problem: dict[str, Any] = r.json()
    assert problem["code"] == "not_found"
    assert problem["status"] == 404
    return problem


def assert_unauthenticated(r: httpx.Response) -> None:
    assert r.status_code == 401, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    assert r.headers["content-type"].split(";")[0].strip() == PROBLEM_JSON
    problem = r.json()
    assert problem["code"] == "unauthenticated"
    assert problem["status"] == 401


def _without_request_id(problem: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in problem.items() if k != "request_id"}


async def call(
    api: Api,
    method: str,
    path: str,
    headers: dict[str, str],
    body: dict[str, Any] | None,
) -> httpx.Response:
    return await api.http.request(method, path, json=body, headers=headers)


# ----- endpoint tables ----------------------------------------------------------------------

# A body builder gets a message id of the target conversation (a random one for unknown ids).
BodyFor = Callable[[str], dict[str, Any] | None]


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str  # with {id}
    body: BodyFor


def _no_body(_message_id: str) -> dict[str, Any] | None:
    return None


CLIENT_ENDPOINTS = [
    Endpoint("get_conversation", "GET", "/v1/client/conversations/{id}", _no_body),
    Endpoint("list_messages", "GET", "/v1/client/conversations/{id}/messages", _no_body),
    Endpoint(
        "create_message",
        "POST",
        "/v1/client/conversations/{id}/messages",
        lambda _m: {"body": "intruder message"},
    ),
    Endpoint(
        "mark_read",
        "POST",
        "/v1/client/conversations/{id}/read",
        lambda m: {"up_to_message_id": m},
    ),
]

AGENT_ENDPOINTS = [
    Endpoint("get_conversation", "GET", "/v1/agent/conversations/{id}", _no_body),
    Endpoint("list_messages", "GET", "/v1/agent/conversations/{id}/messages", _no_body),
    Endpoint(
        "reply",
        "POST",
        "/v1/agent/conversations/{id}/messages",
        lambda _m: {"body": "intruder reply", "internal": False},
    ),
    Endpoint(
        "update",
        "PATCH",
        "/v1/agent/conversations/{id}",
        lambda _m: {"status": "closed", "priority": "urgent", "tags": ["intruder"]},
    ),
    Endpoint("mark_read", "POST", "/v1/agent/conversations/{id}/read", _no_body),
]

# Whose conversation the owner (an end user of app A) asks for.
CLIENT_TARGETS = ["other_user_same_app", "other_app", "unknown_id"]

# For agents, "another end user of the same app" is not a boundary (an agent of app A
# sees all of app A's users), so the cases are about apps instead.
AGENT_CASES = ["other_app", "unknown_id", "agent_without_apps", "agent_removed_from_app"]


def _random_id() -> str:
    return str(uuid.uuid4())


def _client_target(world: World, target: str) -> tuple[str, str]:
    """(conversation id, a message id in it) for a client case."""
    if target == "other_user_same_app":
        return world.neighbour.conversation_id, world.neighbour.message_ids[-1]
    if target == "other_app":
        return world.stranger.conversation_id, world.stranger.message_ids[-1]
    assert target == "unknown_id"
    return _random_id(), _random_id()


# ----- client matrix ------------------------------------------------------------------------


@pytest.mark.parametrize("target", CLIENT_TARGETS)
@pytest.mark.parametrize("endpoint", CLIENT_ENDPOINTS, ids=lambda e: e.name)
async def test_client_endpoint_isolation(api: Api, endpoint: Endpoint, target: str) -> None:
    world = await build_world(api)
    conv_id, message_id = _client_target(world, target)
    before = await snapshot(api, world)

    r = await call(
        api,
        endpoint.method,
        endpoint.path.format(id=conv_id),
        world.owner.headers,
        endpoint.body(message_id),
    )
    problem = assert_not_found(r)

    # Indistinguishable from an id that does not exist at all.
    r_unknown = await call(
        api,
        endpoint.method,
        endpoint.path.format(id=_random_id()),
        world.owner.headers,
        endpoint.body(_random_id()),
    )
    assert _without_request_id(problem) == _without_request_id(assert_not_found(r_unknown))

    after = await snapshot(api, world)
    assert after == before
    # Spelled out for the creates: the target still has its three messages.
    if target != "unknown_id":
        owner = world.neighbour if target == "other_user_same_app" else world.stranger
        messages = after[
            "neighbour.client.messages" if owner is world.neighbour else "stranger.client.messages"
        ]
        assert [m["id"] for m in messages["items"]] == owner.message_ids
        assert all(m["body"] != "intruder message" for m in messages["items"])


async def test_client_read_with_foreign_message_in_own_conversation(api: Api) -> None:
    """The caller's own conversation, but `up_to_message_id` of another user's message."""
    world = await build_world(api)
    before = await snapshot(api, world)
    assert before["owner.client.unread"] == {"unread_count": 1}
    for foreign in (world.neighbour.message_ids[1], world.stranger.message_ids[1], _random_id()):
        r = await api.http.post(
            f"/v1/client/conversations/{world.owner.conversation_id}/read",
            json={"up_to_message_id": foreign},
            headers=world.owner.headers,
        )
        assert_not_found(r)
    assert await snapshot(api, world) == before


async def test_client_lists_only_own_conversations(api: Api) -> None:
    world = await build_world(api)
    for party in (world.owner, world.neighbour, world.stranger):
        page = await _get_json(api, "/v1/client/conversations", party.headers)
        assert [c["id"] for c in page["items"]] == [party.conversation_id]
        assert page["next_cursor"] is None
        # One unread agent reply each, counted only for its own user.
        assert await _get_json(api, "/v1/client/unread", party.headers) == {"unread_count": 1}


async def test_logout_session_sees_nothing_of_identified_user(api: Api) -> None:
    app = await api.create_app()
    installation = uuid.uuid4().hex
    token = identity_token(app.identity_secret, "user-42", kid=app.identity_kid)
    identified = await api.user_headers(app, installation_id=installation, user_token=token)
    conv = await api.feedback(identified, body="private to user-42")

    anonymous = await api.user_headers(app, installation_id=installation)
    page = await _get_json(api, "/v1/client/conversations", anonymous)
    assert page == {"items": [], "next_cursor": None}
    assert_not_found(
        await api.http.get(f"/v1/client/conversations/{conv['id']}", headers=anonymous)
    )
    assert_not_found(
        await api.http.get(f"/v1/client/conversations/{conv['id']}/messages", headers=anonymous)
    )
    assert_not_found(
        await api.http.post(
            f"/v1/client/conversations/{conv['id']}/messages",
            json={"body": "after logout"},
            headers=anonymous,
        )
    )
    # Logging back in finds the conversation untouched.
    again = await api.user_headers(app, installation_id=installation, user_token=token)
    msgs = await _get_json(api, f"/v1/client/conversations/{conv['id']}/messages", again)
    assert [m["body"] for m in msgs["items"]] == ["private to user-42"]


async def test_same_external_id_in_two_apps_are_different_users(api: Api) -> None:
    app_a = await api.create_app("A")
    app_b = await api.create_app("B")
    in_a = await api.user_headers(
        app_a, user_token=identity_token(app_a.identity_secret, "alice", kid=app_a.identity_kid)
    )
    in_b = await api.user_headers(
        app_b, user_token=identity_token(app_b.identity_secret, "alice", kid=app_b.identity_kid)
    )
    conv = await api.feedback(in_a, body="alice in A")
    assert await _get_json(api, "/v1/client/conversations", in_b) == {
        "items": [],
        "next_cursor": None,
    }
    assert_not_found(await api.http.get(f"/v1/client/conversations/{conv['id']}", headers=in_b))


# ----- agent matrix -------------------------------------------------------------------------


async def _agent_case(api: Api, world: World, case: str) -> tuple[dict[str, str], str]:
    """(caller headers, conversation id) for an agent case."""
    if case == "other_app":
        return world.agent_a, world.stranger.conversation_id
    if case == "unknown_id":
        return world.agent_a, _random_id()
    if case == "agent_without_apps":
        return world.agent_none, world.owner.conversation_id
    assert case == "agent_removed_from_app"
    moved_id, moved = await api.create_agent(world.app_a, name="Moved")
    target = world.owner.conversation_id
    r = await api.http.get(f"/v1/agent/conversations/{target}", headers=moved)
    assert r.status_code == 200, r.text  # reachable while assigned
    r = await api.http.patch(
        f"/v1/admin/agents/{moved_id}", json={"app_ids": [world.app_b.id]}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["app_ids"] == [world.app_b.id]
    return moved, target


@pytest.mark.parametrize("case", AGENT_CASES)
@pytest.mark.parametrize("endpoint", AGENT_ENDPOINTS, ids=lambda e: e.name)
async def test_agent_endpoint_isolation(api: Api, endpoint: Endpoint, case: str) -> None:
    world = await build_world(api)
    caller, conv_id = await _agent_case(api, world, case)
    before = await snapshot(api, world)

    r = await call(
        api, endpoint.method, endpoint.path.format(id=conv_id), caller, endpoint.body("")
    )
    problem = assert_not_found(r)
    r_unknown = await call(
        api, endpoint.method, endpoint.path.format(id=_random_id()), caller, endpoint.body("")
    )
    assert _without_request_id(problem) == _without_request_id(assert_not_found(r_unknown))

    after = await snapshot(api, world)
    assert after == before
    for name in ("owner", "neighbour", "stranger"):
        detail = after[f"{name}.agent.get"]
        assert detail["status"] == "open"
        assert detail["priority"] == "normal"
        assert detail["tags"] == []
        assert detail["message_count"] == 3
        assert detail["unread_count"] == 1


async def test_agent_inbox_shows_only_assigned_apps(api: Api) -> None:
    world = await build_world(api)
    a_ids = {world.owner.conversation_id, world.neighbour.conversation_id}

    inbox = await _get_json(api, "/v1/agent/conversations", world.agent_a)
    assert {c["id"] for c in inbox["items"]} == a_ids
    assert {c["app_id"] for c in inbox["items"]} == {world.app_a.id}

    inbox = await _get_json(api, "/v1/agent/conversations", world.agent_b)
    assert [c["id"] for c in inbox["items"]] == [world.stranger.conversation_id]

    assert await _get_json(api, "/v1/agent/conversations", world.agent_none) == {
        "items": [],
        "next_cursor": None,
    }
    for status in ("open", "pending", "solved", "closed"):
        page = await _get_json(api, f"/v1/agent/conversations?status={status}", world.agent_none)
        assert page["items"] == []


@pytest.mark.parametrize("app_filter", ["foreign_app", "unknown_app"])
async def test_agent_inbox_app_filter_outside_own_apps_is_empty(api: Api, app_filter: str) -> None:
    world = await build_world(api)
    app_id = world.app_b.id if app_filter == "foreign_app" else _random_id()
    page = await _get_json(api, f"/v1/agent/conversations?app_id={app_id}", world.agent_a)
    assert page == {"items": [], "next_cursor": None}
    # Combined with other filters too.
    page = await _get_json(
        api,
        f"/v1/agent/conversations?app_id={app_id}&status=open&q=stranger",
        world.agent_a,
    )
    assert page == {"items": [], "next_cursor": None}
    # Positive control: the own app's filter finds both of its conversations.
    page = await _get_json(api, f"/v1/agent/conversations?app_id={world.app_a.id}", world.agent_a)
    assert {c["id"] for c in page["items"]} == {
        world.owner.conversation_id,
        world.neighbour.conversation_id,
    }


async def test_agent_search_does_not_cross_apps(api: Api) -> None:
    world = await build_world(api)
    marker = world.stranger.marker
    page = await _get_json(api, f"/v1/agent/conversations?q={marker}", world.agent_a)
    assert page == {"items": [], "next_cursor": None}
    page = await _get_json(api, f"/v1/agent/conversations?q={marker}", world.agent_b)
    assert [c["id"] for c in page["items"]] == [world.stranger.conversation_id]


async def test_agent_removed_from_app_loses_its_inbox(api: Api) -> None:
    world = await build_world(api)
    moved_id, moved = await api.create_agent(world.app_a, name="Moved")
    inbox = await _get_json(api, "/v1/agent/conversations", moved)
    assert len(inbox["items"]) == 2
    r = await api.http.patch(
        f"/v1/admin/agents/{moved_id}", json={"app_ids": [world.app_b.id]}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    inbox = await _get_json(api, "/v1/agent/conversations", moved)
    assert [c["id"] for c in inbox["items"]] == [world.stranger.conversation_id]


# ----- admin: unknown ids -------------------------------------------------------------------


@dataclass(frozen=True)
class AdminEndpoint:
    name: str
    method: str
    path: str  # with {id} and maybe {kid}
    body: dict[str, Any] | None


ADMIN_ENDPOINTS = [
    AdminEndpoint("get_app", "GET", "/v1/admin/apps/{id}", None),
    AdminEndpoint("update_app", "PATCH", "/v1/admin/apps/{id}", {"name": "Renamed"}),
    AdminEndpoint("rotate_app_keys", "POST", "/v1/admin/apps/{id}/rotate-keys", {}),
    AdminEndpoint(
        "revoke_identity_secret", "DELETE", "/v1/admin/apps/{id}/identity-secrets/{kid}", None
    ),
    AdminEndpoint("push_status", "GET", "/v1/admin/apps/{id}/push", None),
    AdminEndpoint("remove_push_credentials", "DELETE", "/v1/admin/apps/{id}/push/apns", None),
    AdminEndpoint("push_deliveries", "GET", "/v1/admin/apps/{id}/push-deliveries", None),
    AdminEndpoint("list_users", "GET", "/v1/admin/apps/{id}/users", None),
    AdminEndpoint("erase_user", "DELETE", "/v1/admin/apps/{id}/users/{user}", None),
    AdminEndpoint("get_agent", "GET", "/v1/admin/agents/{id}", None),
    AdminEndpoint("update_agent", "PATCH", "/v1/admin/agents/{id}", {"name": "Renamed"}),
    AdminEndpoint("rotate_agent_token", "POST", "/v1/admin/agents/{id}/rotate-token", None),
]


@pytest.mark.parametrize("endpoint", ADMIN_ENDPOINTS, ids=lambda e: e.name)
async def test_admin_unknown_id_is_not_found(api: Api, endpoint: AdminEndpoint) -> None:
    world = await build_world(api)
    before = await snapshot(api, world)
    owner_id = (await _get_json(api, "/v1/client/me", world.owner.headers))["id"]
    path = endpoint.path.format(id=_random_id(), kid=world.app_a.identity_kid, user=owner_id)
    r = await api.http.request(endpoint.method, path, json=endpoint.body, headers=api.admin)
    assert_not_found(r)
    assert await snapshot(api, world) == before
    # The agents' tokens still work (no rotation happened anywhere).
    assert (await api.http.get("/v1/agent/me", headers=world.agent_a)).status_code == 200


@pytest.mark.parametrize("target", ["user_of_other_app", "unknown_user"])
async def test_admin_erase_user_through_the_wrong_app_is_not_found(api: Api, target: str) -> None:
    world = await build_world(api)
    stranger_id = (await _get_json(api, "/v1/client/me", world.stranger.headers))["id"]
    user_id = stranger_id if target == "user_of_other_app" else _random_id()
    before = await snapshot(api, world)
    r = await api.http.delete(f"/v1/admin/apps/{world.app_a.id}/users/{user_id}", headers=api.admin)
    assert_not_found(r)
    assert await snapshot(api, world) == before
    # The user list of app A never shows app B's user.
    users = await _get_json(api, f"/v1/admin/apps/{world.app_a.id}/users", api.admin)
    assert stranger_id not in {u["id"] for u in users["items"]}
    assert len(users["items"]) == 2


# ----- credentials of one role on another role's endpoints -----------------------------------


@dataclass(frozen=True)
class RoleEndpoint:
    name: str
    role: str  # client | agent | admin
    method: str
    path: str  # may use {conv} and {app}
    body: dict[str, Any] | None


ROLE_ENDPOINTS = [
    RoleEndpoint("client_list", "client", "GET", "/v1/client/conversations", None),
    RoleEndpoint("client_get", "client", "GET", "/v1/client/conversations/{conv}", None),
    RoleEndpoint("client_create", "client", "POST", "/v1/client/conversations", {"body": "sneaky"}),
    RoleEndpoint(
        "client_message",
        "client",
        "POST",
        "/v1/client/conversations/{conv}/messages",
        {"body": "sneaky"},
    ),
    RoleEndpoint("client_unread", "client", "GET", "/v1/client/unread", None),
    RoleEndpoint("client_me", "client", "GET", "/v1/client/me", None),
    RoleEndpoint("agent_inbox", "agent", "GET", "/v1/agent/conversations", None),
    RoleEndpoint("agent_get", "agent", "GET", "/v1/agent/conversations/{conv}", None),
    RoleEndpoint(
        "agent_reply",
        "agent",
        "POST",
        "/v1/agent/conversations/{conv}/messages",
        {"body": "sneaky"},
    ),
    RoleEndpoint(
        "agent_update", "agent", "PATCH", "/v1/agent/conversations/{conv}", {"status": "closed"}
    ),
    RoleEndpoint("agent_me", "agent", "GET", "/v1/agent/me", None),
    RoleEndpoint("admin_list_apps", "admin", "GET", "/v1/admin/apps", None),
    RoleEndpoint("admin_get_app", "admin", "GET", "/v1/admin/apps/{app}", None),
    RoleEndpoint("admin_create_app", "admin", "POST", "/v1/admin/apps", {"name": "Sneaky"}),
    RoleEndpoint("admin_update_app", "admin", "PATCH", "/v1/admin/apps/{app}", {"name": "Sneaky"}),
    RoleEndpoint("admin_list_agents", "admin", "GET", "/v1/admin/agents", None),
    RoleEndpoint(
        "admin_create_agent",
        "admin",
        "POST",
        "/v1/admin/agents",
        {"name": "Sneaky", "app_ids": []},
    ),
]

ROLES = ("client", "agent", "admin")
WRONG_CREDENTIALS = [(e, cred) for e in ROLE_ENDPOINTS for cred in ROLES if cred != e.role]


def _credentials(api: Api, world: World, cred: str) -> dict[str, str]:
    if cred == "client":
        return world.owner.headers
    if cred == "agent":
        return world.agent_a
    assert cred == "admin"
    return api.admin


def _role_path(endpoint: RoleEndpoint, world: World) -> str:
    return endpoint.path.format(conv=world.owner.conversation_id, app=world.app_a.id)


async def _release_abandoned_generators() -> None:
    """Let the cyclic GC finalize dependency generators a failed request left suspended.

    Only so that the positive controls below test what they are meant to; the leak
    itself is pinned down by test_rejected_credentials_release_the_transaction.
    """
    gc.collect()
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("endpoint", "cred"),
    WRONG_CREDENTIALS,
    ids=[f"{e.name}-with-{c}-token" for e, c in WRONG_CREDENTIALS],
)
async def test_wrong_credentials_are_unauthenticated(
    api: Api, endpoint: RoleEndpoint, cred: str
) -> None:
    world = await build_world(api)
    before = await snapshot(api, world)
    path = _role_path(endpoint, world)
    r = await api.http.request(
        endpoint.method, path, json=endpoint.body, headers=_credentials(api, world, cred)
    )
    assert_unauthenticated(r)
    assert await snapshot(api, world) == before
    # Positive control: the right credential works on the same endpoint.
    await _release_abandoned_generators()
    right = _credentials(api, world, endpoint.role)
    r = await asyncio.wait_for(
        api.http.request(endpoint.method, path, json=endpoint.body, headers=right), timeout=10
    )
    assert r.status_code in (200, 201), r.text


@pytest.mark.parametrize("endpoint", ROLE_ENDPOINTS, ids=lambda e: e.name)
async def test_missing_or_bogus_credentials_are_unauthenticated(
    api: Api, endpoint: RoleEndpoint
) -> None:
    world = await build_world(api)
    before = await snapshot(api, world)
    path = _role_path(endpoint, world)
    prefix = {"client": "tbs_", "agent": "tbg_", "admin": "tba_"}[endpoint.role]
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {prefix}abc"},
        api.bearer(f"{prefix}not-a-real-token"),
    ):
        r = await api.http.request(endpoint.method, path, json=endpoint.body, headers=headers)
        assert_unauthenticated(r)
        await _release_abandoned_generators()
    assert await snapshot(api, world) == before


def _checked_out(api: Api) -> int:
    pool = api.state.db.engine.pool
    assert isinstance(pool, QueuePool), type(pool)
    return pool.checkedout()


@pytest.mark.parametrize(
    ("endpoint", "cred"),
    WRONG_CREDENTIALS,
    ids=[f"{e.name}-with-{c}-token" for e, c in WRONG_CREDENTIALS],
)
async def test_rejected_credentials_release_the_transaction(
    api: Api, endpoint: RoleEndpoint, cred: str
) -> None:
    """A 401 must not leave its database session (connection, SQLite writer lock) behind.

    The cyclic GC is paused so the outcome does not depend on when it happens to run:
    the server must release the transaction itself, not rely on garbage collection.
    """
    world = await build_world(api)
    assert _checked_out(api) == 0  # sanity: finished requests hold no connection
    gc.collect()
    gc.disable()
    try:
        r = await api.http.request(
            endpoint.method,
            _role_path(endpoint, world),
            json=endpoint.body,
            headers=_credentials(api, world, cred),
        )
        assert_unauthenticated(r)
        assert _checked_out(api) == 0
        # The next write of a legitimate caller is not blocked.
        r = await asyncio.wait_for(
            api.http.post(
                "/v1/client/conversations", json={"body": "after"}, headers=world.owner.headers
            ),
            timeout=10,
        )
        assert r.status_code == 201, r.text
    finally:
        gc.enable()
        await _release_abandoned_generators()


_SPEC = json.loads((Path(__file__).resolve().parents[2] / "sdk-spec" / "openapi.json").read_text())
SECURED = [
    (method.upper(), path)
    for path, operations in _SPEC["paths"].items()
    for method, operation in operations.items()
    if isinstance(operation, dict) and operation.get("security")
]


@pytest.mark.parametrize(("method", "path"), SECURED, ids=[f"{m} {p}" for m, p in SECURED])
async def test_authentication_comes_before_the_route(api: Api, method: str, path: str) -> None:
    """Every secured operation refuses a caller without valid credentials with 401 before
    it reads the body, the path or the query: a broken body, an id that names nothing and
    a limit out of range still answer 401, not 400, 404 or 422."""
    concrete = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path) + "?limit=0&cursor=%25"
    for headers in ({}, api.bearer("tbs_not-a-real-token"), api.bearer("tbg_not-a-real-token")):
        r = await api.http.request(
            method,
            concrete,
            content=b'{"body": ',
            headers={**headers, "Content-Type": "application/json"},
        )
        assert_unauthenticated(r)
