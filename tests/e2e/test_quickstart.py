"""The README quickstart, as a new user runs it: a real `tellback serve` process.

Starts the server in an empty directory (embedded default: SQLite + local disk
under ./tellback-data), reads the admin token it prints once, runs
examples/quickstart.py against it, restarts it, and stops it with SIGTERM. The
PostgreSQL variant runs `tellback migrate` first, as the README says.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import _admin_exec, _db_url, tellback

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELLBACK_")}
    env.update(extra)
    return env


class Server:
    def __init__(self, cwd: Path, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tellback_server", "serve", "--port", str(self.port), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                raise AssertionError(f"server exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not become ready")

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        out, err = self.proc.communicate()
        return self.proc.returncode, out, err


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def test_embedded_default_quickstart(tmp_path: Path, servers: list[Server]) -> None:
    env = base_env()
    server = Server(tmp_path, env)
    servers.append(server)
    server.wait_ready()
    code, out, err = server.stop()
    assert code == 0, err[-2000:]
    token = out.strip().splitlines()[-1]
    assert token.startswith("tba_")
    assert (tmp_path / "tellback-data" / "tellback.db").is_file()
    assert (tmp_path / "tellback-data" / "secret_key").is_file()
    assert '"loop": "uvloop"' in err  # uvicorn's own default, part of uvicorn[standard]

    # Second start: same data dir, no new token, data kept; asyncio's loop works too.
    server = Server(tmp_path, env, "--loop", "asyncio")
    servers.append(server)
    server.wait_ready()
    example = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        env={**env, "TELLBACK_URL": server.url, "TELLBACK_ADMIN_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert example.returncode == 0, example.stderr
    assert "badge: 1" in example.stdout
    apps = httpx.get(f"{server.url}/v1/admin/apps", headers={"Authorization": f"Bearer {token}"})
    assert [a["name"] for a in apps.json()["items"]] == ["Quickstart"]
    code, out, err = server.stop()
    assert code == 0, err[-2000:]
    assert "tba_" not in out
    assert '"loop": "asyncio"' in err


def test_bad_setting_names_the_variable(tmp_path: Path) -> None:
    result = tellback(tmp_path, base_env(TELLBACK_PORT="eighty"), "serve")
    assert result.returncode != 0
    assert "TELLBACK_PORT" in result.stderr


@pytest.fixture
def empty_pg_database(pg_server_url: str) -> Iterator[str]:
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_exec(pg_server_url, f"CREATE DATABASE {name}"))
    yield _db_url(pg_server_url, name)
    asyncio.run(_admin_exec(pg_server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def test_postgresql_migrate_then_serve(
    tmp_path: Path, empty_pg_database: str, servers: list[Server]
) -> None:
    url = make_url(empty_pg_database).render_as_string(hide_password=False)
    env = base_env(TELLBACK_DATABASE_URL=url, TELLBACK_SECRET_KEY="k" * 40)
    refused = tellback(tmp_path, env, "serve", "--port", str(free_port()))
    assert refused.returncode != 0
    assert "tellback migrate" in refused.stderr
    migrated = tellback(tmp_path, env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "database at revision 0" in migrated.stdout
    created = tellback(tmp_path, env, "admin", "create-token")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    server = Server(tmp_path, env, "--no-worker")
    servers.append(server)
    server.wait_ready()
    r = httpx.post(
        f"{server.url}/v1/admin/apps",
        json={"name": "Prod"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 201, r.text
    code, out, err = server.stop()
    assert code == 0, err[-2000:]
    assert "tba_" not in out  # an admin token existed, so none was printed
