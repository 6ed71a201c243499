"""The OpenAPI document alone is enough to write a client.

Generates a Python client from sdk-spec/openapi.json with openapi-python-client (as
an outside team would), imports it, and runs one full scenario with it against the
app in-process: create an app and an agent, start a session, send feedback, reply as
the agent, read the unread count, mark the reply read.

Gaps the generator exposes are asserted here, so that closing one shows up as a
test to update: the ``Idempotency-Key`` request header is not declared on any
operation (a generated client can only send it as a client-wide header).
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tellback_server.asgi import build_state, create_app
from tellback_server.db.models import AdminToken
from tellback_server.jobs.registry import JobRegistry
from tellback_server.security import ADMIN_TOKEN_PREFIX, hash_token, new_token
from tests.server.conftest import lifespan, make_settings

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "sdk-spec" / "openapi.json"
BASE = "http://tellback.test"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The generated package, imported under a name unique to this run."""
    out = tmp_path_factory.mktemp("openapi-client")
    name = f"tellback_generated_{uuid.uuid4().hex[:8]}"
    exe = Path(sys.executable).parent / "openapi-python-client"
    result = subprocess.run(
        [
            str(exe),
            "generate",
            "--path",
            str(OPENAPI),
            "--output-path",
            str(out / name),
            "--meta",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert not warnings, "the generator could not use parts of openapi.json:\n" + result.stdout
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(out))
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


@pytest.fixture
async def transport(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[tuple[Any, str]]:
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    settings = make_settings(f"sqlite+aiosqlite:///{db}", tmp_path / "data")
    state = build_state(settings)
    app = create_app(settings, registry=JobRegistry(), state=state)
    async with lifespan(app):
        token = new_token(ADMIN_TOKEN_PREFIX)
        async with state.db.session(write=True) as session:
            session.add(AdminToken(name="generated-client", token_hash=hash_token(token)))
        yield httpx.ASGITransport(app=app), token  # type: ignore[arg-type]


def test_idempotency_key_is_declared_on_every_create() -> None:
    doc = json.loads(OPENAPI.read_text())
    creates = [
        (path, op)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if method == "post" and "201" in op["responses"] and path != "/v1/client/sessions"
    ]
    assert len(creates) >= 7
    for path, op in creates:
        names = [p.get("name", "").lower() for p in op.get("parameters", [])]
        assert "idempotency-key" in names, path


async def test_full_scenario_with_the_generated_client(
    generated: Any, transport: tuple[Any, str]
) -> None:
    asgi, admin_token = transport
    models = importlib.import_module(generated.__name__ + ".models")
    ops = {
        name: importlib.import_module(f"{generated.__name__}.api.{name}")
        for name in (
            "admin.v1_admin_apps_create_app",
            "admin.v1_admin_agents_create_agent",
            "client.v1_client_sessions_create_session",
            "client.v1_client_conversations_create_conversation",
            "agent.v1_agent_conversations_conversation_id_messages_reply",
            "client.v1_client_conversations_conversation_id_messages_list_messages",
            "client.v1_client_unread_unread",
            "client.v1_client_conversations_conversation_id_read_mark_read",
        )
    }

    def client(token: str | None = None) -> Any:
        args = {"base_url": BASE, "httpx_args": {"transport": asgi}}
        if token is None:
            return generated.Client(**args)
        return generated.AuthenticatedClient(token=token, **args)

    async def call(op: str, c: Any, *args: Any, **kwargs: Any) -> Any:
        async with c:
            r = await ops[op].asyncio_detailed(*args, client=c, **kwargs)
        return r

    r = await call(
        "admin.v1_admin_apps_create_app",
        client(admin_token),
        idempotency_key=str(uuid.uuid4()),
        body=models.AppCreate(name="Generated"),
    )
    assert r.status_code == 201, r.content
    app = r.parsed
    assert app.app_key
    assert app.identity_secret

    r = await call(
        "admin.v1_admin_agents_create_agent",
        client(admin_token),
        idempotency_key=str(uuid.uuid4()),
        body=models.AgentCreate(name="Ada", email="ada@example.com", app_ids=[app.id]),
    )
    assert r.status_code == 201, r.content
    agent_token = r.parsed.token

    r = await call(
        "client.v1_client_sessions_create_session",
        client(),
        body=models.SessionCreate(app_key=app.app_key, installation_id=uuid.uuid4().hex),
    )
    assert r.status_code == 201, r.content
    session = r.parsed.session_token

    r = await call(
        "client.v1_client_conversations_create_conversation",
        client(session),
        idempotency_key=str(uuid.uuid4()),
        body=models.ConversationCreate(body="Generated clients work", tags=["openapi"]),
    )
    assert r.status_code == 201, r.content
    conversation = r.parsed

    r = await call(
        "agent.v1_agent_conversations_conversation_id_messages_reply",
        client(agent_token),
        conversation.id,
        idempotency_key=str(uuid.uuid4()),
        body=models.AgentMessageCreate(body="Thanks for telling us"),
    )
    assert r.status_code == 201, r.content
    reply = r.parsed

    r = await call(
        "client.v1_client_conversations_conversation_id_messages_list_messages",
        client(session),
        conversation.id,
    )
    assert r.status_code == 200, r.content
    assert [m.body for m in r.parsed.items] == ["Generated clients work", "Thanks for telling us"]

    r = await call("client.v1_client_unread_unread", client(session))
    assert r.status_code == 200, r.content
    assert r.parsed.unread_count == 1

    r = await call(
        "client.v1_client_conversations_conversation_id_read_mark_read",
        client(session),
        conversation.id,
        body=models.ReadMarker(up_to_message_id=reply.id),
    )
    assert r.status_code == 204, r.content

    r = await call("client.v1_client_unread_unread", client(session))
    assert r.parsed.unread_count == 0

    # Errors parse as the documented problem+json schema.
    r = await call(
        "client.v1_client_conversations_conversation_id_messages_list_messages",
        client(session),
        uuid.uuid4(),
    )
    assert r.status_code == 404
    assert type(r.parsed).__name__ == "Problem"
    assert r.parsed.code == "not_found"
