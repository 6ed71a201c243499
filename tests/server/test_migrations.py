"""Migrations run up from an empty database on SQLite and PostgreSQL and match the models."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

import tellback_server.db.models  # noqa: F401 (registers every table)
from tellback_server.db.base import metadata
from tellback_server.db.migrate import alembic_config, current_revision, upgrade
from tests.conftest import _admin_exec, _db_url


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    server: str = request.getfixturevalue("pg_server_url")
    name = f"m_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_exec(server, f"CREATE DATABASE {name}"))
    yield _db_url(server, name)
    asyncio.run(_admin_exec(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


def _diff(sync_conn: Any) -> list[Any]:
    # SQLite reflects custom types by affinity (GUID -> NUMERIC), so types are compared on PG.
    compare_type = sync_conn.dialect.name != "sqlite"
    ctx = MigrationContext.configure(sync_conn, opts={"compare_type": compare_type})
    return list(compare_metadata(ctx, metadata))


def _tables(sync_conn: Any) -> set[str]:
    return set(inspect(sync_conn).get_table_names())


async def test_upgrade_from_empty_matches_models(empty_database: str) -> None:
    engine = create_async_engine(empty_database)
    try:
        assert await current_revision(engine) is None
        await upgrade(engine)
        await upgrade(engine)  # a second run is a no-op
        assert await current_revision(engine) == HEAD
        async with engine.connect() as conn:
            tables = await conn.run_sync(_tables)
            diff = await conn.run_sync(_diff)
        assert set(metadata.tables) <= tables
        assert diff == [], f"models and migrations differ: {diff}"
    finally:
        await engine.dispose()


async def test_concurrent_upgrades_apply_once(empty_database: str) -> None:
    engines = [create_async_engine(empty_database) for _ in range(3)]
    try:
        await asyncio.gather(*(upgrade(e) for e in engines))
        assert await current_revision(engines[0]) == HEAD
    finally:
        for e in engines:
            await e.dispose()
