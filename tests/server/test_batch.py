"""PostgreSQL: runs of one statement from concurrent requests sent as one (db/batch.py).

Against a real PostgreSQL: the rows a batch wrote share one transaction (``xmin``);
a request that makes PostgreSQL refuse the batch fails alone, the others are written
once; a cancelled leader leaves the others their rows; a statement whose answer never
came fails for every request in it and is never run again. Then through the API: a
burst of feedback is stored once each, whole.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Float, bindparam, func, insert, literal, select, text, union_all
from sqlalchemy.dialects.postgresql import asyncpg
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from tellback_server.db.base import table_of
from tellback_server.db.batch import Batched, member_name
from tellback_server.db.engine import MAX_CACHED_STATEMENT, Database, LazyTx
from tellback_server.db.models import IdempotencyKey
from tellback_server.db.prepared import Prepared
from tellback_server.domain.conversations import services as conversations
from tests.conftest import _admin_exec
from tests.server.conftest import Api, make_settings
from tests.server.test_prepared import _row as key_row

_KEYS = table_of(IdempotencyKey)
_PID = Prepared(select(func.pg_backend_pid()))
_COLUMNS = ("id", "scope", "key", "request_hash", "expires_at", "created_at", "updated_at")


def _build(count: int) -> Prepared:
    """``count`` key rows, each in a CTE of its own; a row back for each, after
    ``sleep`` seconds (shared) of PostgreSQL's time each."""
    answered = []
    for i in range(count):
        values = select(*(bindparam(member_name(i, k), type_=_KEYS.c[k].type) for k in _COLUMNS))
        row = (
            insert(_KEYS)
            .from_select(list(_COLUMNS), values)
            .returning(_KEYS.c.key)
            .cte(member_name(i, "row"))
        )
        sleep = func.pg_sleep(bindparam("sleep", type_=Float))
        answered.append(select(literal(i), row.c.key, sleep.label("slept")))
    result = (union_all(*answered) if count > 1 else answered[0]).subquery()
    return Prepared(select(*result.c))


def _row(scope: str, key: str, sleep: float = 0.0) -> dict[str, Any]:
    return {**key_row(scope, key), "sleep": sleep}


@pytest.fixture
async def db(database_url: str, tmp_path: Path) -> AsyncIterator[Database]:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite writes go through the process's write group")
    database = Database(make_settings(database_url, tmp_path / "data"))
    try:
        yield database
    finally:
        await database.dispose()


@asynccontextmanager
async def _lazy(db: Database) -> AsyncIterator[LazyTx]:
    """A request's lazy transaction, as a new feedback on PostgreSQL has one."""
    async with db.transaction(write=True, lazy=True) as tx:
        assert isinstance(tx, LazyTx)
        yield tx


async def _fetch(db: Database, batched: Batched, row: dict[str, Any]) -> list[Any]:
    async with _lazy(db) as tx:
        return await batched.fetch(tx, row)


async def _transactions(db: Database, scope: str) -> dict[str, int]:
    """Each key of ``scope`` with the transaction that wrote it."""
    async with db.session(write=False) as session:
        rows = await session.execute(
            text("SELECT key, xmin::text::bigint FROM idempotency_keys WHERE scope = :s"),
            {"s": scope},
        )
        return {key: int(xmin) for key, xmin in rows}


async def _queue(db: Database, batched: Batched, *rows: dict[str, Any]) -> list[asyncio.Task[Any]]:
    """Requests for ``rows`` that start one after the other, so wait in this order."""
    tasks = []
    for row in rows:
        tasks.append(asyncio.create_task(_fetch(db, batched, row)))
        await asyncio.sleep(0.02)
    return tasks


async def _busy_lane(db: Database, batched: Batched, scope: str) -> asyncio.Task[list[Any]]:
    """A request that holds the only lane for about 0.4 s."""
    task = asyncio.create_task(_fetch(db, batched, _row(scope, "first", sleep=0.4)))
    await asyncio.sleep(0.15)  # its statement is running by then
    assert not task.done()
    return task


def test_every_statement_of_a_new_feedback_is_prepared_once_per_connection() -> None:
    """asyncpg keeps a connection's prepared statement only up to a size of SQL: one
    larger is parsed and planned by PostgreSQL on every run."""
    dialect = asyncpg.dialect()  # type: ignore[no-untyped-call]
    batches = [*conversations._NEW_FEEDBACK.values(), *conversations._NEW_HOOKED_FEEDBACK.values()]
    # (compiled here, not through Prepared, whose compiled forms are kept per dialect kind)
    statements = [s.statement for b in batches for s in b._statements.values()]
    sizes = [len(str(s.compile(dialect=dialect)).encode()) for s in statements]
    assert max(sizes) <= MAX_CACHED_STATEMENT


async def test_runs_that_wait_for_a_lane_go_in_one_statement(db: Database) -> None:
    batched = Batched(_build, shared=("sleep",), sizes=(1, 4), lanes=1)
    scope = f"s-{uuid.uuid4().hex}"
    first = await _busy_lane(db, batched, scope)
    others = await _queue(db, batched, *(_row(scope, f"k{i}") for i in range(5)))
    assert await first == [("first", None)]
    # Each request gets its own rows back, and only its own.
    assert [await task for task in others] == [[(f"k{i}", None)] for i in range(5)]
    written = await _transactions(db, scope)
    assert sorted(written) == ["first", "k0", "k1", "k2", "k3", "k4"]
    # The first four waiting went together; the fifth after them, alone.
    assert len({written[f"k{i}"] for i in range(4)}) == 1
    assert len(set(written.values())) == 3


async def test_requests_carried_by_a_statement_never_take_a_connection(db: Database) -> None:
    """Only the request that sends a statement checks a connection out of the pool: the
    ones it carries neither hold one nor wait for one."""
    batched = Batched(_build, shared=("sleep",), sizes=(1, 4), lanes=1)
    scope = f"s-{uuid.uuid4().hex}"

    async def request(key: str) -> tuple[list[Any], bool]:
        async with _lazy(db) as tx:
            rows = await batched.fetch(tx, _row(scope, key))
            return rows, tx.connection is not None

    first = await _busy_lane(db, batched, scope)
    others = []
    for i in range(4):
        others.append(asyncio.create_task(request(f"k{i}")))
        await asyncio.sleep(0.02)
    await first
    outcomes = [await task for task in others]
    assert [rows for rows, _ in outcomes] == [[(f"k{i}", None)] for i in range(4)]
    assert [held for _, held in outcomes] == [True, False, False, False]
    assert len(set((await _transactions(db, scope)).values())) == 2


async def test_requests_of_another_database_neither_wait_nor_go_along(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    """Lanes are per database (engine): a statement runs on its leader's connection,
    so requests of another engine must never ride in it, nor queue behind it."""
    other = Database(make_settings(database_url, tmp_path / "other"))
    try:
        batched = Batched(_build, shared=("sleep",), sizes=(1, 4), lanes=1)
        scope = f"s-{uuid.uuid4().hex}"
        first = await _busy_lane(db, batched, scope)
        assert await _fetch(other, batched, _row(scope, "other")) == [("other", None)]
        assert not first.done()
        await first
    finally:
        await other.dispose()


async def test_a_request_that_fails_the_statement_fails_alone(db: Database) -> None:
    batched = Batched(_build, shared=("sleep",), sizes=(1, 4), lanes=1)
    scope = f"s-{uuid.uuid4().hex}"
    await _fetch(db, batched, _row(scope, "taken"))
    first = await _busy_lane(db, batched, scope)
    keys = ["a", "taken", "b", "c"]  # the second breaks the unique (scope, key)
    others = await _queue(db, batched, *(_row(scope, k) for k in keys))
    await first
    outcomes = await asyncio.gather(*others, return_exceptions=True)
    assert isinstance(outcomes[1], IntegrityError)
    assert [outcomes[i] for i in (0, 2, 3)] == [[("a", None)], [("b", None)], [("c", None)]]
    written = await _transactions(db, scope)
    assert sorted(written) == ["a", "b", "c", "first", "taken"]  # once each
    # The failed statement wrote nothing; each then went alone.
    assert len({written[k] for k in "abc"}) == 3


async def test_a_leader_with_no_connection_fails_the_others_at_once(
    database_url: str, tmp_path: Path
) -> None:
    """When the pool has no connection to lend (all in use, or the database away), the
    request that would send a statement fails after the pool's wait, and the ones it
    would carry fail with its error then, rather than each waiting as long again."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite writes go through the process's write group")
    small = Database(make_settings(database_url, tmp_path / "data"), pool_size=1, pool_timeout=0.3)
    batched = Batched(_build, shared=("sleep",), sizes=(1, 4), lanes=1)
    scope = f"s-{uuid.uuid4().hex}"
    try:
        held = await small.engine.connect()  # the pool's one connection
        try:
            await held.execute(text("SELECT 1"))
            # The first waits for a connection alone; four wait behind it for the lane.
            tasks = await _queue(small, batched, *(_row(scope, k) for k in "abcde"))
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await held.close()
        assert all(isinstance(o, PoolTimeoutError) for o in outcomes), outcomes
        # b led c, d and e: its one wait failed all four, with the one error.
        assert outcomes[0] is not outcomes[1]
        assert all(o is outcomes[1] for o in outcomes[2:])
        assert await _transactions(small, scope) == {}
        assert await _fetch(small, batched, _row(scope, "after")) == [("after", None)]
    finally:
        await small.dispose()


async def test_a_leader_cancelled_mid_statement_leaves_the_others_theirs(db: Database) -> None:
    batched = Batched(_build, shared=("sleep",), sizes=(1, 4), lanes=1)
    scope = f"s-{uuid.uuid4().hex}"
    first = await _busy_lane(db, batched, scope)
    # The first one waiting leads the next statement, which sleeps 4 x 0.15 s.
    others = await _queue(db, batched, *(_row(scope, f"k{i}", sleep=0.15) for i in range(4)))
    await first
    await asyncio.sleep(0.2)  # the batch's statement is running
    others[0].cancel()
    outcomes = await asyncio.gather(*others, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert outcomes[1:] == [[(f"k{i}", None)] for i in (1, 2, 3)]
    written = await _transactions(db, scope)
    # Written once each, the cancelled one's too (its statement had been sent).
    assert sorted(written) == ["first", "k0", "k1", "k2", "k3"]
    assert len({written[f"k{i}"] for i in range(4)}) == 1
    # The lane is free again.
    assert await asyncio.wait_for(_fetch(db, batched, _row(scope, "after")), 5) == [("after", None)]


async def test_cancelled_requests_waiting_or_carried_by_a_statement(db: Database) -> None:
    """One cancelled while it waits is not written; one cancelled while a statement
    carries it is written, and the others get their rows either way."""
    batched = Batched(_build, shared=("sleep",), sizes=(1, 4), lanes=1)
    scope = f"s-{uuid.uuid4().hex}"
    first = await _busy_lane(db, batched, scope)
    waiting = await _queue(db, batched, *(_row(scope, f"w{i}", sleep=0.15) for i in range(5)))
    waiting[1].cancel()  # leaves the queue: w0, w2, w3, w4 go together
    await first
    await asyncio.sleep(0.05)  # that statement (4 x 0.15 s of sleep) is under way
    carried = await _queue(db, batched, *(_row(scope, f"c{i}", sleep=0.15) for i in range(4)))
    await asyncio.sleep(0.6)  # w0's statement is done, c0-c3's (as long) under way
    carried[2].cancel()
    outcomes = await asyncio.gather(*waiting, *carried, return_exceptions=True)
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert isinstance(outcomes[5 + 2], asyncio.CancelledError)
    assert [outcomes[i] for i in (0, 2, 3, 4)] == [[(f"w{i}", None)] for i in (0, 2, 3, 4)]
    assert [outcomes[5 + i] for i in (0, 1, 3)] == [[(f"c{i}", None)] for i in (0, 1, 3)]
    written = await _transactions(db, scope)
    assert sorted(written) == sorted(["first", "w0", "w2", "w3", "w4", "c0", "c1", "c2", "c3"])
    assert await asyncio.wait_for(_fetch(db, batched, _row(scope, "after")), 5) == [("after", None)]


async def test_a_statement_whose_backend_is_terminated_fails_for_all_in_it(
    db: Database, database_url: str
) -> None:
    """PostgreSQL ends the leader's backend mid-statement: every request in the
    statement gets the error (the lost connection is invalidated), nothing of theirs is
    written, and each can simply be sent again."""
    batched = Batched(_build, shared=("sleep",), sizes=(1, 4), lanes=1)
    scope = f"s-{uuid.uuid4().hex}"
    pids: list[int] = []
    invalidated: list[bool] = []

    async def leader() -> list[Any]:
        async with _lazy(db) as tx:
            connection = await tx.connected()
            [(pid,)] = await _PID.fetch_alone(connection, {})
            pids.append(pid)
            try:
                return await batched.fetch(tx, _row(scope, "k0", sleep=0.3))
            finally:
                invalidated.append(connection.invalidated)

    first = await _busy_lane(db, batched, scope)
    others = [asyncio.create_task(leader())]
    await asyncio.sleep(0.05)  # waiting first: it leads
    others += await _queue(db, batched, *(_row(scope, f"k{i}") for i in (1, 2, 3)))
    await first
    await asyncio.sleep(0.3)  # the batch's statement is running
    await _admin_exec(database_url, f"SELECT pg_terminate_backend({pids[0]})")
    outcomes = await asyncio.gather(*others, return_exceptions=True)
    assert all(isinstance(o, DBAPIError) for o in outcomes), outcomes
    assert invalidated == [True]
    assert sorted(await _transactions(db, scope)) == ["first"]
    for i in range(4):
        assert await _fetch(db, batched, _row(scope, f"k{i}")) == [(f"k{i}", None)]


async def test_a_statement_that_never_answered_is_not_run_again(db: Database) -> None:
    """The leader's client side of the connection drops while the statement runs:
    PostgreSQL goes on and commits, but nobody hears. Every request in it gets the
    error (a retry with its Idempotency-Key finds out); none is written twice."""
    batched = Batched(_build, shared=("sleep",), sizes=(1, 4), lanes=1)
    scope = f"s-{uuid.uuid4().hex}"

    async def leader() -> list[Any]:
        async with _lazy(db) as tx:
            connection = await tx.connected()
            raw = (await connection.get_raw_connection()).dbapi_connection
            assert raw is not None

            async def drop_soon() -> None:
                await asyncio.sleep(0.4)  # into the batch's statement
                raw.driver_connection.terminate()

            dropping = asyncio.create_task(drop_soon())
            try:
                return await batched.fetch(tx, _row(scope, "k0", sleep=0.2))
            finally:
                await dropping

    first = await _busy_lane(db, batched, scope)
    others = [asyncio.create_task(leader())]
    await asyncio.sleep(0.05)  # waiting first: it leads
    others += await _queue(db, batched, *(_row(scope, f"k{i}") for i in (1, 2, 3)))
    await first
    outcomes = await asyncio.gather(*others, return_exceptions=True)
    assert all(isinstance(o, DBAPIError) for o in outcomes), outcomes
    assert not any(isinstance(o, IntegrityError) for o in outcomes)
    for _ in range(50):  # PostgreSQL finishes the statement on its own
        written = await _transactions(db, scope)
        if len(written) == 5:
            break
        await asyncio.sleep(0.1)
    assert sorted(written) == ["first", "k0", "k1", "k2", "k3"]
    assert len({written[f"k{i}"] for i in range(4)}) == 1


async def test_a_burst_of_feedback_is_stored_once_each_and_whole(
    api: Api, database_url: str
) -> None:
    """Through the API on PostgreSQL, 40 new feedbacks at once (some retried with the
    same key): each is one conversation with its message, its event and its stored
    answer, and those rows came in fewer transactions than feedbacks."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite writes go through the process's write group")
    app = await api.create_app()
    users = [await api.user_headers(app) for _ in range(4)]

    async def send(i: int) -> Any:
        body = {"body": f"feedback {i}"}
        headers = {**users[i % 4], "Idempotency-Key": f"burst-{i % 30}"}
        return await api.http.post("/v1/client/conversations", json=body, headers=headers)

    responses = await asyncio.gather(*(send(i) for i in range(40)))
    assert {r.status_code for r in responses} == {201}, [r.text for r in responses]
    by_key: dict[tuple[str, str], set[str]] = {}
    for i, r in enumerate(responses):
        by_key.setdefault((users[i % 4]["Authorization"], f"burst-{i % 30}"), set()).add(
            r.json()["id"]
        )
    assert all(len(ids) == 1 for ids in by_key.values())  # a retry got the same one
    ids = {next(iter(v)) for v in by_key.values()}
    assert len(ids) == len(by_key)
    async with api.state.db.session(write=False) as session:
        counts = (
            await session.execute(
                text(
                    "SELECT count(*), count(DISTINCT c.xmin::text),"
                    " (SELECT count(*) FROM messages m WHERE m.conversation_id = ANY(:ids)),"
                    " (SELECT count(*) FROM events e WHERE e.conversation_id = ANY(:ids)"
                    "  AND e.type = 'conversation.created')"
                    " FROM conversations c WHERE c.id = ANY(:ids)"
                ),
                {"ids": [uuid.UUID(i) for i in ids]},
            )
        ).one()
    conversations, transactions, messages, events = counts
    assert (conversations, messages, events) == (len(ids),) * 3
    assert transactions < conversations
