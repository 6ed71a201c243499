"""Apply Alembic migrations programmatically (``tellback migrate`` and ``tellback serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url)
    return cfg


_LOCKS: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}


def _process_lock() -> asyncio.Lock:
    # Alembic's `context`/`op` are process-wide proxies: one migration at a time per process.
    loop = asyncio.get_running_loop()
    return _LOCKS.setdefault(loop, asyncio.Lock())


@contextlib.contextmanager
def _sqlite_file_lock(engine: AsyncEngine) -> Iterator[None]:
    """An advisory lock beside the SQLite file, so `serve` and `worker` starting together
    do not both create the schema."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database.startswith(":memory:"):
        yield
        return
    lock_path = Path(database).with_name(Path(database).name + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision``.

    Concurrent starts apply migrations once: PostgreSQL through an advisory lock,
    SQLite through a lock file beside the database.
    """
    async with _process_lock():
        if engine.dialect.name == "sqlite":
            lock = _sqlite_file_lock(engine)
            await asyncio.to_thread(lock.__enter__)
            try:
                await _upgrade(engine, revision)
            finally:
                lock.__exit__(None, None, None)
        else:
            await _upgrade(engine, revision)


async def _upgrade(engine: AsyncEngine, revision: str) -> None:
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.exec_driver_sql("SELECT pg_advisory_lock(727274)")
        try:
            await conn.run_sync(_upgrade_sync, revision)
            await conn.commit()
        finally:
            if conn.dialect.name == "postgresql":
                await conn.exec_driver_sql("SELECT pg_advisory_unlock(727274)")
                await conn.commit()


def _upgrade_sync(connection: object, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision()
        )
