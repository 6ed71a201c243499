"""Engine and session factory for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL mode with one writer: transactions that write start with
``BEGIN IMMEDIATE`` (so two writers queue on the lock instead of failing with
``SQLITE_BUSY`` when a read snapshot upgrades), and an in-process lock keeps
writers of this process from busy-waiting on each other. Readers never block.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from tellback_server.settings import Settings

_IMMEDIATE = "tellback_sqlite_immediate"


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN is ours to emit.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """The process's engine, session factory and (on SQLite) the writer lock."""

    def __init__(self, settings: Settings, *, pool_size: int = 10) -> None:
        self.url = settings.database_url
        self.is_sqlite = settings.is_sqlite
        # PostgreSQL: a pooled connection the server dropped (restart, failover) is found
        # at checkout and replaced, instead of failing requests until it is discarded.
        kwargs: dict[str, Any] = {"pool_pre_ping": not settings.is_sqlite}
        if self.is_sqlite:
            path = settings.sqlite_path
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_timeout=10)
            # A database that does not answer within 5 s is an outage (503), not a hang.
            kwargs["connect_args"] = {"command_timeout": 30, "timeout": 5}
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        # A Session subclass of our own, so commit hooks (job wake-ups) stay per process/app.
        self.session_class: type[Session] = type("TellbackSession", (Session,), {})
        # Names this process's sessions in cross-process notifications (events).
        self.instance = uuid.uuid4().hex[:16]
        self.sessionmaker = async_sessionmaker(
            self.engine,
            expire_on_commit=False,
            sync_session_class=self.session_class,
            info={"instance": self.instance},
        )
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @asynccontextmanager
    async def session(self, *, write: bool) -> AsyncIterator[AsyncSession]:
        """A session whose transaction commits on success and rolls back on error."""
        if self._write_lock is not None and write:
            async with self._write_lock, self._open(write=True) as session:
                yield session
        else:
            async with self._open(write=write) as session:
                yield session

    @asynccontextmanager
    async def _open(self, *, write: bool) -> AsyncIterator[AsyncSession]:
        async with self.sessionmaker() as session:
            if self.is_sqlite and write:
                await session.connection(execution_options={_IMMEDIATE: True})
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    async def dispose(self) -> None:
        await self.engine.dispose()
