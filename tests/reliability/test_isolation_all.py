"""The isolation matrix over every operation of the OpenAPI document.

- every `/v1/client/*` operation with a path id, called by an end user of app A with the
  ids of app B's objects -> 404 `not_found`, exactly as for a random id; and called by
  another end user of app A (a neighbour: the same app key, another installation)
  with the first one's ids -> the same;
- every `/v1/agent/*` operation with a path id, called by app A's agent with app B's ids ->
  the same;
- every `/v1/admin/*` operation without a token, with an agent token and with a session
  token -> 401; every client and agent operation without a token or with the other
  role's token -> 401.

The object of app B is unchanged afterwards (its owner still sees the same thing).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tellback_server.asgi import create_app
from tellback_server.plugins import build_registry
from tellback_server.settings import Settings
from tests.reliability.world import Side, World, seed
from tests.server.conftest import Api, make_settings, serve_app

SPEC: dict[str, Any] = create_app(
    Settings(database_url="sqlite+aiosqlite:///:memory:", secret_key="x" * 32)
).openapi_schema.to_schema()
OPERATIONS = sorted(
    (method.upper(), path)
    for path, ops in SPEC["paths"].items()
    for method in ops
    if path.startswith("/v1/")
)
STREAMS = {"/v1/client/events", "/v1/agent/events"}


def _body(method: str, path: str, world: World) -> dict[str, Any] | None:
    if method in ("GET", "DELETE"):
        return None
    if path.endswith("/read"):
        return {"up_to_message_id": world.b.message_ids[-1]}
    if path.endswith("/messages"):
        return {"body": "intruder"}
    if path.startswith("/v1/agent/conversations/"):
        return {"status": "solved"}
    return {}


def _fill(path: str, ids: dict[str, str]) -> str:
    for name, value in ids.items():
        path = path.replace("{" + name + "}", value)
    return path


@pytest.fixture(scope="module")
async def world(
    sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Api, World]]:
    tmp = tmp_path_factory.mktemp("isolation")
    shutil.copyfile(sqlite_template, tmp / "tellback.db")
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp / 'tellback.db'}",
        tmp / "data",
        port=8080,
        webhook_allow_private=True,
    )
    async with serve_app(settings, build_registry(), base_url="http://127.0.0.1:8080") as api:
        yield api, await seed(api)


CROSS = [
    (m, p)
    for m, p in OPERATIONS
    if "{" in p and p.startswith(("/v1/client/", "/v1/agent/")) and p not in STREAMS
]


@pytest.mark.parametrize(("method", "path"), CROSS, ids=[f"{m} {p}" for m, p in CROSS])
async def test_other_apps_ids_are_not_found(
    world: tuple[Api, World], method: str, path: str
) -> None:
    api, w = world
    headers = w.a.user if path.startswith("/v1/client/") else w.a.agent
    owner = w.b.user if path.startswith("/v1/client/") else w.b.agent
    body = _body(method, path, w)
    before = await _owner_view(api, w.b, owner, path) if method != "GET" else None
    theirs = await api.http.request(method, _fill(path, w.b.ids), json=body, headers=headers)
    random_ids = {k: str(uuid.uuid4()) for k in w.b.ids}
    unknown = await api.http.request(method, _fill(path, random_ids), json=body, headers=headers)
    assert theirs.status_code == 404, f"{method} {path}: {theirs.status_code} {theirs.text}"
    assert theirs.json()["code"] == "not_found"
    strip = {"request_id", "instance"}
    assert {k: v for k, v in theirs.json().items() if k not in strip} == {
        k: v for k, v in unknown.json().items() if k not in strip
    }
    if before is not None:
        assert await _owner_view(api, w.b, owner, path) == before


NEIGHBOUR = [(m, p) for m, p in CROSS if p.startswith("/v1/client/")]


@pytest.mark.parametrize(("method", "path"), NEIGHBOUR, ids=[f"{m} {p}" for m, p in NEIGHBOUR])
async def test_a_neighbours_ids_are_not_found(
    world: tuple[Api, World], method: str, path: str
) -> None:
    """Another end user of the same app (the app key is public: anyone can be one)
    reaches nothing of the first one's by its ids."""
    api, w = world
    neighbour = await api.user_headers(w.a.app)
    body = _body(method, path, w)
    before = await _owner_view(api, w.a, w.a.user, path) if method != "GET" else None
    theirs = await api.http.request(method, _fill(path, w.a.ids), json=body, headers=neighbour)
    random_ids = {k: str(uuid.uuid4()) for k in w.a.ids}
    unknown = await api.http.request(method, _fill(path, random_ids), json=body, headers=neighbour)
    assert theirs.status_code == 404, f"{method} {path}: {theirs.status_code} {theirs.text}"
    strip = {"request_id", "instance"}
    assert {k: v for k, v in theirs.json().items() if k not in strip} == {
        k: v for k, v in unknown.json().items() if k not in strip
    }
    if before is not None:
        assert await _owner_view(api, w.a, w.a.user, path) == before


async def _owner_view(api: Api, side: Side, owner: dict[str, str], path: str) -> Any:
    prefix = "/v1/client" if path.startswith("/v1/client/") else "/v1/agent"
    out = []
    for p in (
        f"{prefix}/conversations/{side.conversation_id}",
        f"{prefix}/conversations/{side.conversation_id}/messages",
    ):
        r = await api.http.get(p, headers=owner)
        assert r.status_code == 200, r.text
        out.append(r.json())
    if prefix == "/v1/client":
        r = await api.http.get(f"/v1/client/uploads/{side.upload_id}", headers=owner)
        out.append({k: v for k, v in r.json().items() if "url" not in k and k != "parts"})
    return out


AUTH = [(m, p) for m, p in OPERATIONS if p != "/v1/client/sessions"]


@pytest.mark.parametrize(("method", "path"), AUTH, ids=[f"{m} {p}" for m, p in AUTH])
async def test_wrong_or_missing_credentials_are_401(
    world: tuple[Api, World], method: str, path: str
) -> None:
    api, w = world
    url = _fill(path, w.a.ids)
    if path.startswith("/v1/admin/"):
        wrong = [w.a.agent, w.a.user]
    elif path.startswith("/v1/agent/"):
        wrong = [w.a.user, api.admin]
    else:
        wrong = [w.a.agent, api.admin]
    for headers in [{}, {"Authorization": "Bearer tbs_not-a-real-token"}, *wrong]:
        r = await api.http.request(method, url, json=_body(method, path, w), headers=headers)
        assert r.status_code == 401, f"{method} {path} with {headers}: {r.status_code} {r.text}"
        assert r.json()["code"] == "unauthenticated"
