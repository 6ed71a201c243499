"""SQLite's hot-path transactions: statements on the loop's thread, never a blocking wait.

`Database.transaction` runs the ingest path's statements on the event loop with a
busy timeout of 0, and moves WAL checkpoints to a thread. These tests hold the
write lock from another connection (as another process would), and check that
the loop keeps serving while a writer waits, that the write lands once the lock
is free, and that the WAL is checkpointed without any request doing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tellback_server.db.engine import AfterGroupCommit, Database
from tellback_server.db.prepared import Prepared
from tellback_server.http.errors import is_database_unavailable
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


def _write_then_fail(session: Session, value: str) -> None:
    _write(session, value)
    raise RuntimeError("boom")


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
    with pytest.raises(RuntimeError):
        async with db.transaction(write=True) as tx:
            await tx.run(_write_then_fail, "rolled-back")
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


def _wal_restarts(path: Path) -> int:
    """The WAL header's salt-1, which SQLite adds one to each time the WAL starts over."""
    with open(f"{path}-wal", "rb") as wal:
        header = wal.read(32)
    return int.from_bytes(header[16:20], "big")


async def test_the_wal_starts_over_under_sustained_writes(
    sqlite_db: tuple[Database, Path],
) -> None:
    """Writers that queue back to back always find frames the checkpoint has not copied
    yet, so SQLite would never start the WAL over: it grew by every commit, hundreds of
    MB a minute under load, each write extending the file. The checkpointer's last pass
    pauses this process's writers, so the next one starts the WAL from its beginning."""
    db, path = sqlite_db
    async with db.transaction(write=True) as tx:
        await tx.run(_write, "first")
    first = _wal_restarts(path)
    deadline = time.monotonic() + 10.0  # under a second here; a loaded machine's rounds last longer

    async def writer(n: int) -> None:
        i = 0
        while time.monotonic() < deadline and _wal_restarts(path) - first < 3:
            async with db.transaction(write=True) as tx:
                await tx.run(_write, f"w{n}-{i}" + "x" * 2000)
            i += 1

    await asyncio.gather(*(writer(n) for n in range(16)))
    # A checkpoint every 0.25 s: a restart in most rounds, none at all without the pause.
    assert _wal_restarts(path) - first >= 3


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


# ----- group commit: writers queued behind each other share one COMMIT -------------------


async def _kinds(db: Database) -> list[str]:
    async with db.transaction(write=False) as tx:
        return await tx.run(lambda s: sorted(s.execute(text("SELECT kind FROM jobs")).scalars()))


def _count_commits(db: Database) -> list[int]:
    assert db.sync_engine is not None
    commits = [0]

    def count(_conn: object) -> None:
        commits[0] += 1

    event.listen(db.sync_engine, "commit", count)
    return commits


def _mark(session: Session, value: str) -> None:
    """What a writer leaves for the commit hooks (as pending events and jobs are)."""
    _write(session, value)
    session.info.setdefault("test_published", []).append(value)


async def test_queued_writers_share_one_commit(sqlite_db: tuple[Database, Path]) -> None:
    db, _ = sqlite_db
    published: list[list[str]] = []
    db.on_commit("test_published", published.append)
    commits = _count_commits(db)

    async def write(i: int) -> None:
        async with db.transaction(write=True) as tx:
            await tx.run(_mark, f"w{i:02}")

    await asyncio.gather(*(write(i) for i in range(20)))
    assert await _kinds(db) == [f"w{i:02}" for i in range(20)]
    assert commits[0] < 5, f"{commits[0]} commits for 20 writers queued together"
    assert sorted(v for batch in published for v in batch) == [f"w{i:02}" for i in range(20)]


def _sqlite_temp_files() -> list[str]:
    """SQLite's temporary files this process holds open (unlinked ``etilqs_*`` files)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (closed meanwhile, e.g. the listing's own fd)
            target = os.readlink(f"/proc/self/fd/{fd}")
            if "etilqs_" in target:
                found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
async def test_a_groups_savepoints_keep_their_journal_in_memory(
    sqlite_db: tuple[Database, Path],
) -> None:
    """Each member after the first runs in a SAVEPOINT, whose undo journal SQLite keeps
    in a temporary file once it passes 64 KiB, unless temp_store is MEMORY: under load,
    tens of file writes per request and a file created per group (bench_ingest)."""
    db, _ = sqlite_db
    commits = _count_commits(db)
    temp_files: list[list[str]] = []

    def wide_write(session: Session, value: str) -> None:
        for i in range(20):
            _write(session, f"{value}-{i:02}-" + "x" * 4000)
        # Pages the group changed before this member's savepoint are journaled when it
        # changes them again (as the newest pages of each table and index are): here,
        # enough of them to pass the threshold.
        session.execute(text("UPDATE jobs SET attempts = attempts + 1"))
        temp_files.append(_sqlite_temp_files())

    async def write(value: str) -> None:
        async with db.transaction(write=True) as tx:
            await tx.run(wide_write, value)

    await asyncio.gather(*(write(f"w{i}") for i in range(4)))
    assert commits[0] < 4, "the writers did not share a transaction: no savepoints ran"
    assert len(await _kinds(db)) == 4 * 20
    assert temp_files == [[], [], [], []]


async def test_connections_are_set_up_for_the_write_path(
    sqlite_db: tuple[Database, Path],
) -> None:
    """Every connection, writers' and readers', of both engines: WAL, NORMAL sync, foreign
    keys, savepoint journals in memory, no waiting on a lock, checkpoints left to the
    process, a WAL that shrinks back to 64 MiB, and a 16 MiB page cache (the random-leaf
    pages a write group touches stay cached instead of being read back from the WAL)."""
    db, _ = sqlite_db
    pragmas = (
        "journal_mode",
        "synchronous",
        "foreign_keys",
        "temp_store",
        "busy_timeout",
        "wal_autocheckpoint",
        "journal_size_limit",
        "cache_size",
    )
    expected = ["wal", 1, 1, 2, 0, 0, 64 << 20, -16384]

    def read(session: Session) -> list[Any]:
        return [session.execute(text(f"PRAGMA {p}")).scalar() for p in pragmas]

    async with db.transaction(write=True) as tx:
        assert await tx.run(read) == expected
    async with db.transaction(write=False) as tx:
        assert await tx.run(read) == expected
    async with db.session(write=False) as session:
        assert await session.run_sync(read) == expected


async def test_commit_hooks_run_once_the_group_has_committed(
    sqlite_db: tuple[Database, Path],
) -> None:
    """What a member hands to the hooks (events to publish, jobs to wake for) must be
    visible to every other connection by then: a SAVEPOINT's release is no commit."""
    db, path = sqlite_db
    seen: list[tuple[list[str], list[str]]] = []

    def check(values: list[str]) -> None:
        with sqlite3.connect(path) as other:  # another connection, as any reader has
            rows = other.execute("SELECT kind FROM jobs ORDER BY kind").fetchall()
        seen.append((values, [kind for (kind,) in rows]))

    db.on_commit("test_published", check)

    async def write(value: str) -> None:
        async with db.transaction(write=True) as tx:
            await tx.run(_mark, value)

    await asyncio.gather(*(write(f"w{i}") for i in range(5)))
    assert seen, "the hook never ran"
    for values, committed in seen:
        assert set(values) <= set(committed), f"{values} announced before commit: {committed}"


async def test_a_failing_member_of_a_group_is_undone_alone(
    sqlite_db: tuple[Database, Path],
) -> None:
    db, _ = sqlite_db
    published: list[list[str]] = []
    db.on_commit("test_published", published.append)
    commits = _count_commits(db)

    def write_then_fail(session: Session) -> None:
        _mark(session, "failed")
        raise RuntimeError("boom")

    async def write(value: str) -> None:
        async with db.transaction(write=True) as tx:
            if value == "failed":
                await tx.run(write_then_fail)
            await tx.run(_mark, value)

    results = await asyncio.gather(
        write("first"), write("failed"), write("third"), return_exceptions=True
    )
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], RuntimeError)
    assert commits[0] == 1  # one group: the failure did not end it
    assert await _kinds(db) == ["first", "third"]
    assert published == [["first", "third"]]  # nothing of the failed writer is announced


async def test_a_failing_first_member_leaves_the_others_whole(
    sqlite_db: tuple[Database, Path],
) -> None:
    db, _ = sqlite_db

    async def fail() -> None:
        async with db.transaction(write=True) as tx:
            await tx.run(_write_then_fail, "failed")

    async def write(value: str) -> None:
        async with db.transaction(write=True) as tx:
            await tx.run(_write, value)

    results = await asyncio.gather(fail(), write("second"), write("third"), return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert list(results[1:]) == [None, None]
    assert await _kinds(db) == ["second", "third"]


async def test_a_failed_group_commit_fails_every_member(sqlite_db: tuple[Database, Path]) -> None:
    db, _ = sqlite_db
    fail = [True]

    def refuse(_session: Session) -> None:
        if fail[0]:
            raise RuntimeError("disk full")

    event.listen(db.session_class, "before_commit", refuse)

    async def write(value: str) -> None:
        async with db.transaction(write=True) as tx:
            await tx.run(_write, value)

    results = await asyncio.gather(*(write(f"w{i}") for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results), results
    fail[0] = False
    await write("after")  # the lock and the next group are fine
    assert await _kinds(db) == ["after"]


class _Answered(AfterGroupCommit):
    """What an idempotent replay of an earlier member's row raises."""


async def test_an_answer_from_the_group_waits_for_its_commit(
    sqlite_db: tuple[Database, Path],
) -> None:
    """A member whose failure answers from what an earlier member of its group wrote
    (an idempotent replay) is undone at once but raises only after the COMMIT."""
    db, _ = sqlite_db
    order: list[str] = []
    db.on_commit("test_published", lambda _v: order.append("committed"))

    def replay(session: Session, _value: str) -> None:
        _mark(session, "replayed")  # undone: the request's own work
        raise _Answered("from the first member's row")

    async def write(value: str) -> None:
        async with db.transaction(write=True) as tx:
            await tx.run(replay if value == "replayed" else _mark, value)
        order.append(f"{value} answered")

    async def replayed() -> None:
        try:
            await write("replayed")
        except _Answered:
            order.append("replayed raised")

    await asyncio.gather(write("first"), replayed(), write("third"))
    assert order.index("replayed raised") > order.index("committed"), order
    assert await _kinds(db) == ["first", "third"]


async def test_an_answer_from_the_group_fails_with_its_commit(
    sqlite_db: tuple[Database, Path],
) -> None:
    """... and if that COMMIT fails, the member gets the commit's error, not the answer
    from rows that were lost."""
    db, _ = sqlite_db

    def refuse(_session: Session) -> None:
        raise RuntimeError("disk full")

    event.listen(db.session_class, "before_commit", refuse)

    def replay(_session: Session, _value: str) -> None:
        raise _Answered("from the first member's row")

    async def write(value: str) -> None:
        async with db.transaction(write=True) as tx:
            await tx.run(replay if value == "replayed" else _write, value)

    first, replayed = await asyncio.gather(
        write("first"), write("replayed"), return_exceptions=True
    )
    assert isinstance(first, RuntimeError)
    assert isinstance(replayed, RuntimeError), replayed  # not _Answered
    event.remove(db.session_class, "before_commit", refuse)
    # Alone in its group (the first member), it answers at once: what it read was committed.
    with pytest.raises(_Answered):
        await write("replayed")


async def test_an_orm_writer_commits_an_open_group_before_it_begins(
    sqlite_db: tuple[Database, Path],
) -> None:
    """ORM services write through ``Database.session``: it must not wait for a group that
    is waiting for it (a deadlock until the 30 s lock timeout)."""
    db, _ = sqlite_db

    async def grouped(value: str) -> None:
        async with db.transaction(write=True) as tx:
            await tx.run(_write, value)

    async def orm(value: str) -> None:
        async with db.session(write=True) as session:
            await session.run_sync(_write, value)

    await asyncio.wait_for(asyncio.gather(grouped("a"), orm("orm"), grouped("c")), 5)
    assert await _kinds(db) == ["a", "c", "orm"]


async def test_a_writer_cancelled_in_the_queue_does_not_hold_the_group_open(
    sqlite_db: tuple[Database, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first writer leaves its group open for the one queued behind it, which is then
    cancelled (its client went away) before it takes the lock: the group still commits."""
    db, _ = sqlite_db

    async def write(value: str) -> None:
        async with db.transaction(write=True) as tx:
            await tx.run(_write, value)

    first = asyncio.create_task(write("first"))
    queued = asyncio.create_task(write("cancelled"))
    check = db._commit_if_idle

    def check_then_cancel(group: Any) -> None:
        check(group)  # the queued writer still counts: the group stays open ...
        queued.cancel()  # ... and then it gives up

    monkeypatch.setattr(db, "_commit_if_idle", check_then_cancel)
    await asyncio.wait_for(first, 5)
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert await _kinds(db) == ["first"]


async def test_a_prepared_statement_raises_sqlalchemys_errors(
    sqlite_db: tuple[Database, Path],
) -> None:
    """Errors of statements run on the driver's cursor (db/prepared.py) arrive as
    ``Session.execute`` would raise them, so the error handlers see an outage (a locked
    or lost database: 503) or a constraint for what it is."""
    db, _ = sqlite_db
    missing = Prepared(text("SELECT * FROM no_such_table"))
    with pytest.raises(OperationalError, match="no such table"):
        async with db.transaction(write=False) as tx:
            await tx.run(missing.execute, {})
    other = sqlite3.connect(sqlite_db[1], isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        insert = Prepared(text("INSERT INTO admin_tokens (id) VALUES (randomblob(16))"))
        async with db.transaction(write=False) as tx:
            with pytest.raises(OperationalError, match="locked") as caught:
                await tx.run(insert.execute, {})
        assert is_database_unavailable(caught.value)
    finally:
        other.execute("ROLLBACK")
        other.close()
