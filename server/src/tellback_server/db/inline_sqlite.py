"""An aiosqlite-shaped SQLite connection whose calls run at once, on the event loop's thread.

SQLAlchemy's asyncio SQLite dialect drives aiosqlite, which runs every call on a
thread of its own. A statement costs several hand-offs to that thread, and under
load each hand-off also waits for the GIL, which the busy event loop holds for up
to the 5 ms switch interval: in ``tests/bench/bench_ingest.py`` that made a
conversation list cost about 13 ms of wall time per request at 32 connections.
SQLite answers an indexed statement from its page cache in microseconds, so this
connection simply runs each call when it is made and hands SQLAlchemy an
awaitable that is already done (``create_async_engine(async_creator=...)`` is the
public hook for such a connection).

Nothing here may wait, or the whole server would: connections are opened with a
busy timeout of 0, and ``Database`` retries a writer's ``BEGIN IMMEDIATE`` with
``asyncio.sleep`` while another process holds SQLite's write lock (writers of this
process queue on an ``asyncio.Lock`` before they get here). In WAL mode readers
never wait. A statement that has to scan a large table does hold the loop for as
long as it runs; the code avoids those on request paths, and deployments big
enough to have them belong on PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any


class InlineCursor:
    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    async def execute(self, sql: str, parameters: Any = None) -> InlineCursor:
        self._cursor.execute(sql, () if parameters is None else parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> InlineCursor:
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> Sequence[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> Sequence[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _RunNow:
    """Stands in for aiosqlite's request queue, which SQLAlchemy's ``isolation_level``
    setter posts to directly: the function runs at once and settles the future."""

    def put_nowait(self, item: tuple[Any, Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as exc:  # noqa: BLE001 (handed to the awaiting caller)
            future.set_exception(exc)


class InlineConnection:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection
        self._tx = _RunNow()

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    async def cursor(self) -> InlineCursor:
        return InlineCursor(self._conn.cursor())

    async def execute(self, sql: str, parameters: Any = None) -> InlineCursor:
        return await InlineCursor(self._conn.cursor()).execute(sql, parameters)

    async def commit(self) -> None:
        self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        self._conn.close()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    def stop(self) -> None:
        self._conn.close()


async def connect(path: str) -> InlineConnection:
    # check_same_thread off: SQLAlchemy may close a pooled connection from the thread
    # that garbage-collects it; every use is from the event loop's thread.
    return InlineConnection(sqlite3.connect(path, timeout=0, check_same_thread=False))
