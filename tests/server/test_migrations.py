"""Migrations run up from an empty database on SQLite and PostgreSQL and match the models."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC, JsonB
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


async def test_0006_makes_events_missing_views_sql_null(empty_database: str) -> None:
    """Events written before 0006 stored a missing view as JSON's null, which the
    streams' ``IS NOT NULL`` let through; 0006 makes them SQL NULL and leaves views."""
    engine = create_async_engine(empty_database)
    now = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
    app_id = uuid.uuid4()
    apps = sa.table(
        "apps",
        *(sa.column(k) for k in ("name", "app_key")),
        sa.column("id", GUID()),
        sa.column("settings", JsonB),
        sa.column("created_at", DateTimeUTC(timezone=True)),
        sa.column("updated_at", DateTimeUTC(timezone=True)),
    )
    events = sa.table(  # as written before 0006: None as JSON's null
        "events",
        sa.column("id", sa.Integer()),
        sa.column("type", sa.String()),
        sa.column("app_id", GUID()),
        sa.column("data", JsonB),
        sa.column("client_data", JsonB),
        sa.column("created_at", DateTimeUTC(timezone=True)),
    )
    view = {"conversation": {"id": "c"}, "note": None}
    try:
        await upgrade(engine, "0005")
        async with engine.begin() as conn:
            await conn.execute(
                apps.insert().values(
                    id=app_id, name="A", app_key="k", settings={}, created_at=now, updated_at=now
                )
            )
            for type_, data, client_data in (
                ("unread.changed", None, view),
                ("message.created", view, None),
                ("conversation.created", view, view),
            ):
                row = {"type": type_, "app_id": app_id, "created_at": now}
                await conn.execute(
                    events.insert().values(data=data, client_data=client_data, **row)
                )
            null = sa.text("SELECT count(*) FROM events WHERE data IS NULL OR client_data IS NULL")
            assert (await conn.execute(null)).scalar_one() == 0  # the bug: JSON's null
        await upgrade(engine)
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(
                    events.c.type,
                    events.c.data.is_(None),
                    events.c.client_data.is_(None),
                    events.c.data,
                    events.c.client_data,
                ).order_by(events.c.id)
            )
            assert [tuple(r) for r in rows] == [
                ("unread.changed", True, False, None, view),
                ("message.created", False, True, view, None),
                ("conversation.created", False, False, view, view),
            ]
    finally:
        await engine.dispose()
