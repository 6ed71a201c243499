"""Prepared statements (db/prepared.py) on both databases: in the caller's transaction,
with SQLAlchemy's errors.

A :class:`Prepared` runs on the driver's cursor of the session's connection, not
through ``Session.execute``; these pin that it still behaves as that would: it
begins the session's transaction, sees and is undone with the rest of it, and
raises SQLAlchemy's exception classes (which the error handlers map to 409/503).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import pickle
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import String, bindparam, func, literal, literal_column, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.exc import OperationalError as SAOperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from tellback_server.db.base import table_of
from tellback_server.db.engine import Database, LazyTx
from tellback_server.db.models import IdempotencyKey
from tellback_server.db.prepared import Prepared, insert_into
from tests.conftest import _admin_exec
from tests.server.conftest import make_settings

_KEYS = table_of(IdempotencyKey)
_COLUMNS = ("id", "scope", "key", "request_hash", "expires_at", "created_at", "updated_at")
_INSERT = insert_into(_KEYS, _COLUMNS, returning="id")
_BY_SCOPE = Prepared(
    select(_KEYS.c.key, _KEYS.c.expires_at)
    .where(_KEYS.c.scope == bindparam("scope"))
    .order_by(_KEYS.c.key)
)


@pytest.fixture
async def db(database_url: str, tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(make_settings(database_url, tmp_path / "data"))
    try:
        yield database
    finally:
        await database.dispose()


def _row(scope: str, key: str) -> dict[str, Any]:
    now = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
    return {
        "id": uuid.uuid4(),
        "scope": scope,
        "key": key,
        "request_hash": "h",
        "expires_at": now + dt.timedelta(days=1),
        "created_at": now,
        "updated_at": now,
    }


def _count(session: Session, scope: str) -> int:
    return int(
        session.execute(
            select(func.count()).select_from(_KEYS).where(_KEYS.c.scope == scope)
        ).scalar_one()
    )


async def test_statements_share_the_sessions_transaction(db: Database) -> None:
    scope = f"s-{uuid.uuid4().hex}"
    row = _row(scope, "a")

    def insert_then_read(session: Session) -> tuple[list[Any], int, list[Any]]:
        returned = _INSERT.execute(session, row)  # the transaction's first statement
        return returned, _count(session, scope), _BY_SCOPE.execute(session, {"scope": scope})

    async with db.transaction(write=True) as tx:
        returned, seen, rows = await tx.run(insert_then_read)
    assert [tuple(r) for r in returned] == [(row["id"],)]  # RETURNING, converted to a UUID
    assert seen == 1  # the ORM session's statement saw the prepared one's row
    assert [tuple(r) for r in rows] == [("a", row["expires_at"])]

    def insert_then_fail(session: Session) -> None:
        _INSERT.execute(session, _row(scope, "b"))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        async with db.transaction(write=True) as tx:
            await tx.run(insert_then_fail)
    async with db.transaction(write=False) as tx:
        assert await tx.run(_count, scope) == 1  # undone with the rest of its transaction


async def test_ids_are_stored_as_the_orm_stores_them(db: Database) -> None:
    """A UUID, or its hex as the GUID type also takes it, is stored as the ORM stores it
    (SQLite: the 16 bytes, by a shortcut for UUIDs; PostgreSQL: a uuid, a UUID handed
    to asyncpg as it is by another shortcut); the ORM finds each by its id."""
    scope = f"s-{uuid.uuid4().hex}"
    as_uuid, as_hex = _row(scope, "uuid"), _row(scope, "hex")
    as_hex["id"] = as_hex["id"].hex
    async with db.transaction(write=True) as tx:
        await tx.run(_INSERT.execute, as_uuid)
        await tx.run(_INSERT.execute, as_hex)
    async with db.session(write=False) as session:
        for row in (as_uuid, as_hex):
            found = await session.get(IdempotencyKey, uuid.UUID(str(row["id"])))
            assert found is not None
            assert found.key == row["key"]
        stored = select(func.hex(_KEYS.c.id)) if db.is_sqlite else select(_KEYS.c.id)
        ids = (await session.execute(stored.where(_KEYS.c.scope == scope))).scalars().all()
    expected = {as_uuid["id"], uuid.UUID(as_hex["id"])}
    if db.is_sqlite:
        assert set(ids) == {u.hex.upper() for u in expected}
    else:
        assert set(ids) == expected


async def test_times_are_stored_as_the_orm_stores_them(db: Database) -> None:
    """A UTC datetime (by a shortcut on SQLite), one in another zone and one on a whole
    second are stored as the ORM's own statement stores them, and read back equal."""
    scope = f"s-{uuid.uuid4().hex}"
    paris = dt.timezone(dt.timedelta(hours=1))
    times = {
        "utc": dt.datetime(2026, 11, 27, 7, 30, 1, 250, tzinfo=dt.UTC),
        "zoned": dt.datetime(2026, 11, 27, 8, 30, 1, 999999, tzinfo=paris),
        "whole": dt.datetime(2026, 11, 27, 7, 30, 1, tzinfo=dt.UTC),
    }
    rows = []
    for name, at in times.items():
        rows.append({**_row(scope, f"prepared-{name}"), "expires_at": at})
        rows.append({**_row(scope, f"orm-{name}"), "expires_at": at})
    async with db.transaction(write=True) as tx:
        for row in rows[::2]:
            await tx.run(_INSERT.execute, row)
    async with db.session(write=True) as session:
        session.add_all(IdempotencyKey(**row) for row in rows[1::2])
    stored = select(_KEYS.c.key, func.cast(_KEYS.c.expires_at, String), _KEYS.c.expires_at)
    async with db.session(write=False) as session:
        found = {
            key: (text_, at)
            for key, text_, at in await session.execute(stored.where(_KEYS.c.scope == scope))
        }
    for name, at in times.items():
        assert found[f"prepared-{name}"] == found[f"orm-{name}"]
        assert found[f"prepared-{name}"][1] == at


async def test_ids_and_times_are_read_as_the_orm_reads_them(db: Database) -> None:
    """What a prepared SELECT gives back (SQLite: ids and times converted by shortcuts)
    is what ``Session.execute`` gives for the same statement: equal, of the same types,
    hashing, printing and pickling alike, aware datetimes in UTC, NULL as None."""
    scope = f"s-{uuid.uuid4().hex}"
    times = [
        dt.datetime(2026, 11, 27, 7, 30, 1, 250, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 27, 8, 30, 1, 999999, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        dt.datetime(2026, 11, 27, 7, 30, 1, tzinfo=dt.UTC),  # a whole second
        dt.datetime(1, 1, 1, tzinfo=dt.UTC),
    ]
    async with db.session(write=True) as session:
        session.add_all(
            IdempotencyKey(**{**_row(scope, f"k{i}"), "expires_at": at})
            for i, at in enumerate(times)
        )
    statement = (
        select(
            _KEYS.c.id,
            _KEYS.c.expires_at,
            _KEYS.c.created_at,
            literal(None, type_=GUID()).label("no_id"),
            literal(None, type_=DateTimeUTC(timezone=True)).label("no_time"),
        )
        .where(_KEYS.c.scope == bindparam("scope"))
        .order_by(_KEYS.c.key)
    )
    async with db.transaction(write=False) as tx:
        prepared = await tx.run(Prepared(statement).execute, {"scope": scope})
    async with db.session(write=False) as session:
        orm = [tuple(r) for r in await session.execute(statement, {"scope": scope})]
    assert [r[1] for r in orm] == times
    assert len(prepared) == len(orm) == len(times)
    for ours, theirs in zip(prepared, orm, strict=True):
        assert tuple(ours) == theirs
        for a, b in zip(ours, theirs, strict=True):
            assert type(a) is type(b)
            assert (hash(a), str(a), repr(a)) == (hash(b), str(b), repr(b))
            assert pickle.loads(pickle.dumps(a)) == b  # noqa: S301 (our own bytes)
        assert ours[0].is_safe == theirs[0].is_safe
        assert ours[1].tzinfo == ours[2].tzinfo == dt.UTC
        assert ours[3:] == (None, None)


async def test_errors_arrive_as_sqlalchemys(db: Database) -> None:
    scope = f"s-{uuid.uuid4().hex}"
    async with db.transaction(write=True) as tx:
        await tx.run(_INSERT.execute, _row(scope, "same"))
    with pytest.raises(IntegrityError):
        async with db.transaction(write=True) as tx:
            await tx.run(_INSERT.execute, _row(scope, "same"))
    missing = Prepared(text("SELECT * FROM no_such_table"))
    with pytest.raises((ProgrammingError, SAOperationalError), match="no_such_table"):
        async with db.transaction(write=False) as tx:
            await tx.run(missing.execute, {})
    # The connections those failures ran on are fine for the next transaction.
    for _ in range(3):
        async with db.transaction(write=False) as tx:
            assert [tuple(r) for r in await tx.run(_BY_SCOPE.execute, {"scope": scope})] == [
                ("same", _row(scope, "same")["expires_at"])
            ]


async def test_fetch_alone_commits_by_itself_outside_the_sessions_transaction(
    db: Database,
) -> None:
    """PostgreSQL's one-statement writes (a new feedback): no BEGIN, no COMMIT, yet the
    row is there for everyone at once, whatever the session does after; errors are
    SQLAlchemy's; and a connection with a transaction open is refused, since the
    statement would go around it."""
    if db.is_sqlite:
        pytest.skip("SQLite writes go through the process's write group")
    scope = f"s-{uuid.uuid4().hex}"
    row = _row(scope, "a")

    async def write_then_fail() -> None:
        async with db.session(write=True) as session:
            connection = await session.connection()
            returned = await _INSERT.fetch_alone(connection, row)
            assert [tuple(r) for r in returned] == [(row["id"],)]  # converted to a UUID
            async with db.session(write=False) as other:  # committed: seen elsewhere at once
                assert await other.run_sync(_count, scope) == 1
            raise RuntimeError("boom")  # the session rolls back: nothing of its own to undo

    with pytest.raises(RuntimeError, match="boom"):
        await write_then_fail()
    async with db.transaction(write=False) as tx:
        assert await tx.run(_count, scope) == 1

    async with db.session(write=True) as session:
        connection = await session.connection()
        with pytest.raises(IntegrityError):
            await _INSERT.fetch_alone(connection, row)
        # The failed statement left no transaction behind on the connection.
        assert [tuple(r) for r in await _BY_SCOPE.fetch_alone(connection, {"scope": scope})] == [
            ("a", row["expires_at"])
        ]

    async with db.session(write=True) as session:
        await session.run_sync(_count, scope)  # begins the session's transaction
        with pytest.raises(RuntimeError, match="no transaction open"):
            await _INSERT.fetch_alone(await session.connection(), _row(scope, "b"))
    async with db.transaction(write=False) as tx:
        assert await tx.run(_count, scope) == 1


async def test_a_lazy_transaction_opens_a_session_only_when_it_must(db: Database) -> None:
    """PostgreSQL's ``transaction(lazy=True)``: statements alone on its connection, no
    session unless ``run`` needs one (then on the same connection, committed at the
    end); the commit hooks get what the statements alone left even when the rest
    fails, since those had committed."""
    if db.is_sqlite:
        async with db.transaction(write=True, lazy=True) as tx:  # SQLite: as without
            assert not isinstance(tx, LazyTx)
        return
    handed: list[Any] = []
    db.on_commit("test.lazy", handed.append)
    scope = f"s-{uuid.uuid4().hex}"

    pool = db.engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    async with db.transaction(write=True, lazy=True) as tx:
        assert isinstance(tx, LazyTx)
        assert pool.checkedout() == 0  # none held until a statement needs it
        await _INSERT.fetch_alone(await tx.connected(), _row(scope, "alone"))
        assert pool.checkedout() == 1
        tx.info["test.lazy"] = "alone"
        assert tx.session is None
    assert tx.session is None
    assert pool.checkedout() == 0
    assert handed == ["alone"]

    async def alone_then_fail() -> None:
        async with db.transaction(write=True, lazy=True) as tx:
            assert isinstance(tx, LazyTx)
            await _INSERT.fetch_alone(await tx.connected(), _row(scope, "committed"))
            tx.info["test.lazy"] = "committed"
            await tx.run(_INSERT.execute, _row(scope, "undone"))  # in a transaction
            assert tx.session is not None
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await alone_then_fail()
    assert handed == ["alone", "committed"]
    assert pool.checkedout() == 0

    async with db.transaction(write=True, lazy=True) as tx:
        await tx.run(_INSERT.execute, _row(scope, "in a session"))
    async with db.transaction(write=False) as tx:
        keys = [row[0] for row in await tx.run(_BY_SCOPE.execute, {"scope": scope})]
    assert keys == ["alone", "committed", "in a session"]


_PID = Prepared(select(func.pg_backend_pid()))
_SLEEP = Prepared(select(func.pg_sleep(literal_column("5"))))


async def test_a_connection_lost_under_a_statement_is_invalidated(
    db: Database, database_url: str
) -> None:
    """Prepared statements run past SQLAlchemy's Connection, which invalidates the
    connection of a statement that failed as lost; they do it themselves, in a
    transaction and alone. Otherwise the pool lent the dead connection out again, and a
    connection back a moment ago is not pinged at checkout: under steady traffic every
    request it was lent to failed."""
    if db.is_sqlite:
        pytest.skip("SQLite has no server to lose")

    async def terminate_soon(pid: int) -> None:
        await asyncio.sleep(0.3)  # the statement is running by then
        await _admin_exec(database_url, f"SELECT pg_terminate_backend({pid})")

    invalidated: list[bool] = []  # their connections', right after the statements failed
    pids: list[int] = []

    async def alone() -> None:
        async with db.session(write=True) as session:
            connection = await session.connection()
            [(pid,)] = await _PID.fetch_alone(connection, {})
            pids.append(pid)
            terminating = asyncio.create_task(terminate_soon(pid))
            try:
                await _SLEEP.fetch_alone(connection, {})
            except DBAPIError:
                invalidated.append(connection.invalidated)
                raise
            finally:
                await terminating

    def sleep(session: Session) -> None:
        try:
            _SLEEP.execute(session, {})
        except DBAPIError:
            invalidated.append(session.connection().invalidated)
            raise

    async def in_a_transaction() -> None:
        async with db.session(write=True) as session:
            pids.append(int(await session.scalar(text("SELECT pg_backend_pid()")) or 0))
            terminating = asyncio.create_task(terminate_soon(pids[-1]))
            try:
                await session.run_sync(sleep)
            finally:
                await terminating

    for run in (alone, in_a_transaction):
        with pytest.raises(DBAPIError) as lost:
            await run()
        assert lost.value.connection_invalidated
        assert invalidated[-1], run.__name__
    async with db.session(write=False) as session:  # a new backend, not a dead one
        assert await session.scalar(text("SELECT pg_backend_pid()")) not in (*pids, None)
