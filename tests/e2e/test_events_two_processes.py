"""Two `tellback serve` processes on one PostgreSQL: an event committed by one
reaches a stream held by the other (LISTEN/NOTIFY), and a stop with open
streams is quick and clean."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import fresh_database
from tests.e2e.test_quickstart import Server, base_env
from tests.server.live import sse

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def pg_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request, "postgres", tmp_path) as url:
        yield url


def _admin_token(env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tellback_server", "admin", "create-token"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip().splitlines()[-1]


async def test_an_event_committed_by_one_process_reaches_a_stream_on_another(
    pg_database: str, tmp_path: Path
) -> None:
    env = base_env(
        TELLBACK_DATABASE_URL=pg_database,
        TELLBACK_SECRET_KEY="two-process-test-key-0123456789abcdef",
        TELLBACK_LOG_FORMAT="json",
        TELLBACK_LOG_LEVEL="warning",  # keep the unread pipes small
    )
    admin = {"Authorization": f"Bearer {_admin_token(env, tmp_path)}"}
    servers: list[Server] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            server = Server(tmp_path / name, {**env, "TELLBACK_DATA_DIR": str(tmp_path / name)})
            servers.append(server)
        for server in servers:
            server.wait_ready()
        a, b = servers
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=10) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b,
        ):
            app = (await on_a.post("/v1/admin/apps", json={"name": "Two"}, headers=admin)).json()
            agent_r = await on_a.post(
                "/v1/admin/agents", json={"name": "Ada", "app_ids": [app["id"]]}, headers=admin
            )
            agent = {"Authorization": f"Bearer {agent_r.json()['token']}"}
            session = await on_a.post(
                "/v1/client/sessions",
                json={"app_key": app["app_key"], "installation_id": uuid.uuid4().hex},
            )
            user = {"Authorization": f"Bearer {session.json()['session_token']}"}
            conv = (
                await on_a.post("/v1/client/conversations", json={"body": "Hi"}, headers=user)
            ).json()
            async with (
                sse(on_b, "/v1/client/events", user) as user_on_b,
                sse(on_a, "/v1/agent/events", agent) as agent_on_a,
            ):
                started = time.perf_counter()
                r = await on_a.post(
                    f"/v1/agent/conversations/{conv['id']}/messages",
                    json={"body": "Answer from A"},
                    headers=agent,
                )
                assert r.status_code == 201
                got = await user_on_b.next()
                # Delivery is at least once: B may publish the conversation's creation,
                # committed on A just before this stream opened, once its NOTIFY lands.
                while got.event == "conversation.created":
                    got = await user_on_b.next()
                elapsed = time.perf_counter() - started
                assert got.event == "message.created"
                assert got.data["data"]["message"]["body"] == "Answer from A"
                assert elapsed < 2.0
                # And the other way round: the user writes through B, the agent listens on A.
                r = await on_b.post(
                    f"/v1/client/conversations/{conv['id']}/messages",
                    json={"body": "Thanks (via B)"},
                    headers=user,
                )
                assert r.status_code == 201
                bodies: list[str] = []
                while "Thanks (via B)" not in bodies:  # the agent's own reply comes first
                    event = await agent_on_a.next()
                    if event.event == "message.created":
                        bodies.append(event.data["data"]["message"]["body"])
                assert bodies == ["Answer from A", "Thanks (via B)"]
                # A stop with streams open ends them and exits cleanly, well inside
                # uvicorn's graceful timeout.
                stopping = time.perf_counter()
                code, _, err = b.stop()
                assert code == 0, err[-2000:]
                assert time.perf_counter() - stopping < 5
                with pytest.raises((EOFError, httpx.RemoteProtocolError)):  # noqa: PT012
                    for _ in range(10):  # what was already sent, then the end
                        await user_on_b.next()
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
