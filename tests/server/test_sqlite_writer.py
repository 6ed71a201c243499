"""SQLite's hot-path transactions: statements on the loop's thread, never a blocking wait.

`Database.transaction` runs the ingest path's statements on the event loop with a
busy timeout of 0, and moves WAL checkpoints to a thread. These tests hold the
write lock from another connection (as another process would), and check that
the loop keeps serving while a writer waits, that the write lands once the lock
is free, and that the WAL is checkpointed without any request doing it.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from tellback_server.db.engine import Database
from tests.server.conftest import make_settings


@pytest.fixture
async def sqlite_db(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[tuple[Database, Path]]:
    path = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, path)
    db = Database(make_settings(f"sqlite+aiosqlite:///{path}", tmp_path / "data"))
    try:
        yield db, path
    finally:
        await db.dispose()


def _write(session: Session, value: str) -> None:
    session.execute(
        text(
            "INSERT INTO jobs (id, kind, payload, status, attempts, max_attempts, run_after, "
            "created_at, updated_at) VALUES (randomblob(16), :kind, '{}', 'done', 0, 1, "
            "'2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
        ),
        {"kind": value},
    )


async def test_a_writer_waits_for_another_process_lock_without_blocking_the_loop(
    sqlite_db: tuple[Database, Path],
) -> None:
    db, path = sqlite_db
    other = sqlite3.connect(path, isolation_level=None)  # another process, in effect
    other.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def write() -> float:
        began = time.monotonic()
        async with db.transaction(write=True) as tx:
            await tx.run(_write, "waited")
        return time.monotonic() - began

    ticking = asyncio.create_task(ticker())
    writing = asyncio.create_task(write())
    await asyncio.sleep(0.5)
    assert not writing.done()  # still waiting for the lock ...
    assert ticks >= 20  # ... while the loop went on serving
    other.execute("COMMIT")
    waited = await asyncio.wait_for(writing, 5)
    ticking.cancel()
    other.close()
    assert waited >= 0.5
    async with db.transaction(write=False) as tx:
        rows = await tx.run(
            lambda s: s.execute(text("SELECT count(*) FROM jobs WHERE kind = 'waited'")).scalar()
        )
    assert rows == 1


async def test_a_failed_transaction_leaves_nothing_and_frees_the_lock(
    sqlite_db: tuple[Database, Path],
) -> None:
    db, _ = sqlite_db

    def write_then_fail(session: Session) -> None:
        _write(session, "rolled-back")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        async with db.transaction(write=True) as tx:
            await tx.run(write_then_fail)
    async with db.transaction(write=True) as tx:  # the lock is free again
        await tx.run(_write, "after")
    async with db.transaction(write=False) as tx:
        kinds = await tx.run(lambda s: sorted(s.execute(text("SELECT kind FROM jobs")).scalars()))
    assert kinds == ["after"]


async def test_the_wal_is_checkpointed_off_the_request_path(
    sqlite_db: tuple[Database, Path],
) -> None:
    """Request connections never checkpoint (wal_autocheckpoint=0): the main database file
    only grows because the background checkpointer copies the WAL into it."""
    db, path = sqlite_db
    before = path.stat().st_size
    for i in range(400):
        async with db.transaction(write=True) as tx:
            await tx.run(_write, f"job-{i}" + "x" * 500)
    for _ in range(100):  # up to 5 s
        if path.stat().st_size > before:
            break
        await asyncio.sleep(0.05)
    assert path.stat().st_size > before


async def test_a_disposed_database_is_freed(sqlite_template: Path, tmp_path: Path) -> None:
    """Nothing global (SQLAlchemy's event registry, prepared-statement caches) keeps a
    Database, its engines and their caches alive once it is disposed."""
    path = tmp_path / "freed.db"
    shutil.copyfile(sqlite_template, path)
    db = Database(make_settings(f"sqlite+aiosqlite:///{path}", tmp_path / "data"))
    db.on_commit("test_key", lambda _: None)
    async with db.transaction(write=True) as tx:
        await tx.run(_write, "one")
    async with db.session(write=True) as session:
        await session.execute(text("SELECT 1"))
    await db.dispose()
    ref = weakref.ref(db)
    del db
    gc.collect()
    assert ref() is None
