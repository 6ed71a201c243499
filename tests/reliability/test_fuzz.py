"""Schemathesis over every operation of the OpenAPI document, with valid credentials.

The app runs in-process (schemathesis' ASGI transport, its own event loop
thread) on a SQLite database, then on a PostgreSQL one, each seeded through the
public API (`world.seed`): two apps, each with an end user, a conversation, an
attachment, a device, a webhook and a delivery. Every generated case gets the credential its
operation's security scheme names, and most path parameters are replaced by
real ids (a fixed share keeps the generated value, so unknown ids are covered
too). Admin operations act on app B and on a spare agent, so a fuzzed
`PATCH`, `DELETE` or `rotate-*` never locks the client and agent cases out.

Checks: no 5xx, documented status codes, content types, response bodies and
headers match the schema. Positive and negative (schema-violating) inputs.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tellback_server.asgi import create_app
from tellback_server.jobs.registry import JobRegistry
from tellback_server.plugins import build_registry
from tellback_server.settings import Settings
from tests.conftest import fresh_database
from tests.reliability.world import World, seed
from tests.server.conftest import Api, make_settings, serve_app

# What /schema/openapi.json serves (the fixture checks it), built as `tellback openapi` does.
SPEC: dict[str, Any] = json.loads(
    json.dumps(
        create_app(
            Settings(database_url="sqlite+aiosqlite:///:memory:", secret_key="x" * 32)
        ).openapi_schema.to_schema()
    )
)
# Live event streams never end by themselves; tests/server/test_events.py covers them.
STREAMS = {"/v1/client/events", "/v1/agent/events"}
MAX_EXAMPLES = 12
SEEN: dict[str, Counter[int]] = {}


def _corrected(spec: dict[str, Any]) -> dict[str, Any]:
    """The document, corrected for spec bugs found by the fuzzer if they ever come back.

    Each correction has its own test below, against the real document; both are fixed.
    """
    fixed: dict[str, Any] = json.loads(json.dumps(spec))

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if _ambiguous_one_of(node):
                node["anyOf"] = node.pop("oneOf")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(fixed)
    responses = fixed["paths"]["/v1/client/sessions"]["post"]["responses"]
    responses.setdefault("401", fixed["paths"]["/v1/client/me"]["get"]["responses"]["401"])
    return fixed


def _ambiguous_one_of(node: dict[str, Any]) -> bool:
    types = {m.get("type") for m in node.get("oneOf", []) if isinstance(m, dict)}
    return {"integer", "number"} <= types


schema = schemathesis.openapi.from_dict(_corrected(SPEC)).exclude(path=sorted(STREAMS))

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]

pytestmark = [pytest.mark.timeout(180)]


@dataclass
class Target:
    world: World
    admin_token: str
    spare: dict[str, str]
    client: Any


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """The app on each database: PostgreSQL runs code SQLite never does (the batched
    statements, its own types and limits: it refused U+0000 with a 500 once)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    with fresh_database(request, request.param, tmp) as url:
        config = make_settings(url, tmp / "data", port=8080, webhook_allow_private=True)

        async def prepare() -> Target:
            async with serve_app(config, build_registry(), base_url="http://127.0.0.1:8080") as api:
                world = await seed(api)
                spare = await spares(api, world)
                served = (await api.http.get("/schema/openapi.json")).json()
                assert served == SPEC, "the served document differs"
                return Target(world, api.admin_token, spare, None)

        prepared = asyncio.run(prepare())
        prepared.client = asgi.get_client(
            create_app(config, registry=JobRegistry())  # type: ignore[arg-type]
        )
        try:
            yield prepared
        finally:
            asgi.shutdown_lifespans()


async def spares(api: Api, world: World) -> dict[str, str]:
    """Objects of app B that fuzzed admin DELETEs, PATCHes and rotations may destroy."""
    r = await api.http.post(
        "/v1/admin/agents",
        json={"name": "Spare", "email": "spare@example.com", "app_ids": [world.b.app.id]},
        headers=api.admin,
    )
    assert r.status_code == 201, r.text
    agent_id = r.json()["id"]
    hooks = []
    for name in ("patched", "deleted"):
        r = await api.http.post(
            f"/v1/admin/apps/{world.b.app.id}/webhooks",
            json={"url": f"http://127.0.0.1:9/{name}", "events": ["message.created"]},
            headers=api.admin,
        )
        assert r.status_code == 201, r.text
        hooks.append(r.json()["id"])
    user = (await api.session(world.b.app))["user"]["id"]
    return {
        "agent_id": agent_id,
        "webhook_id": hooks[0],
        "delete.webhook_id": hooks[1],
        "delete.user_id": user,
    }


def _keep_generated(value: Any) -> bool:
    """One case in four keeps its generated id (deterministic, so Hypothesis can replay)."""
    return zlib.crc32(repr(value).encode()) % 4 == 0


def prepare_case(case: Any, t: Target) -> None:
    security = case.operation.definition.raw.get("security") or [{}]
    scheme = next(iter(security[0]), None)
    world = t.world
    token = {
        "adminToken": t.admin_token,
        "agentToken": world.a.agent_token,
        "sessionToken": world.a.session_token,
    }.get(scheme or "")
    if token is not None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
    side = world.b if scheme == "adminToken" else world.a
    body = case.body if isinstance(case.body, dict) else {}
    for name, real in (("app_key", side.app.app_key), ("up_to_message_id", side.message_ids[-1])):
        if isinstance(body.get(name), str) and not _keep_generated(body[name]):
            body[name] = real
    if not case.path_parameters:
        return
    ids = dict(side.ids)
    if scheme == "adminToken" and case.method != "GET":
        ids.update({k: v for k, v in t.spare.items() if "." not in k})
    if scheme == "adminToken" and case.method == "DELETE":
        ids.update({k.removeprefix("delete."): v for k, v in t.spare.items() if "." in k})
    for name, value in list(case.path_parameters.items()):
        if name in ids and not _keep_generated(value):
            case.path_parameters[name] = ids[name]


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_operation(case: Any, target: Target) -> None:
    prepare_case(case, target)
    response = case.call_and_validate(session=target.client, checks=CHECKS)
    SEEN.setdefault(f"{case.method} {case.path}", Counter())[response.status_code] += 1


def test_fuzz_reached_real_objects() -> None:
    """The fuzz above ran with working credentials and real ids, not just 401/404s."""
    if not SEEN:
        pytest.skip("the fuzz cases did not run (selected out)")
    unauthenticated = {op: dict(c) for op, c in SEEN.items() if c.get(401)}
    assert set(unauthenticated) <= {"POST /v1/client/sessions"}, unauthenticated
    documented = {f"{m.upper()} {p}" for p, ops in SPEC["paths"].items() for m in ops}
    succeeded = {op for op, c in SEEN.items() if any(200 <= s < 300 for s in c)}
    # Generated data cannot make these succeed: bodies that need real secrets (an APNs
    # key, a service account) or a reachable URL; ids only the seed knows the meaning of
    # (a failed delivery to replay, a kid that is not the app's last, an upload not yet
    # attached). Every other operation must have answered 2xx on some database.
    rarely = {
        "PUT /v1/admin/apps/{app_id}/push/apns",
        "PUT /v1/admin/apps/{app_id}/push/fcm",
        "POST /v1/admin/apps/{app_id}/webhooks",
        "POST /v1/admin/apps/{app_id}/webhook-deliveries/{delivery_id}/replay",
        "DELETE /v1/admin/apps/{app_id}/identity-secrets/{kid}",
        "DELETE /v1/client/uploads/{upload_id}",
    }
    missing = sorted(documented - succeeded - rarely - {f"GET {p}" for p in STREAMS})
    assert missing == [], f"never answered 2xx: {missing}"


# ----- spec bugs the fuzzer found (fixed), checked directly --------------------------------


def test_sessions_document_401() -> None:
    assert "401" in SPEC["paths"]["/v1/client/sessions"]["post"]["responses"]


def test_no_ambiguous_one_of() -> None:
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if _ambiguous_one_of(node):
                found.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(SPEC, "#")
    assert found == []
