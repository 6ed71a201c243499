"""Engine, sessions and transactions for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL mode with one writer: transactions that write start with
``BEGIN IMMEDIATE`` (so two writers queue on the lock instead of failing with
``SQLITE_BUSY`` when a read snapshot upgrades), and an in-process lock keeps
writers of this process from waiting on each other inside SQLite. Readers never
block. Statements run on the event loop's own thread (``db/inline_sqlite.py`` for
the ORM's async sessions, the stdlib driver for :class:`Tx`): an indexed
statement takes microseconds, while a hand-off to a driver thread costs tens of
microseconds and, under load, a wait for the GIL. So nothing may wait inside
SQLite: the busy timeout is 0, and a writer that finds another *process* holding
the lock retries with ``asyncio.sleep`` (up to 30 s). WAL checkpoints, which
SQLite would otherwise run inside a COMMIT, run on a thread (``_checkpoints``),
which pauses this process's writers for its last pass so that the WAL starts over.

Two ways in:

- :meth:`Database.session` -- an ``AsyncSession`` for the ORM services.
- :meth:`Database.transaction` -- a :class:`Tx` that runs plain (sync) functions
  of a ``Session`` inside one transaction: the hot paths (ingest, idempotency,
  events, session checks), with :mod:`db.prepared` statements. On PostgreSQL
  that is ``AsyncSession.run_sync`` on a pooled connection; on SQLite a plain
  ``Session`` on the stdlib driver, with no greenlet or adapter in between.

Both fire the same commit hooks (:meth:`Database.on_commit`): what a transaction
left in ``session.info`` under a hook's key is handed to the hook once it has
committed (event publishing, worker wake-ups).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import msgspec
import structlog
from sqlalchemy import Engine, bindparam, create_engine, event, func, select
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from tellback_server.db import batch, inline_sqlite
from tellback_server.db.prepared import Prepared, raw_connection
from tellback_server.settings import Settings

log = structlog.get_logger("tellback.db")

_IMMEDIATE = "tellback_sqlite_immediate"
_NOTIFY_KEY = "tellback_pg_notify"  # session.info: NOTIFYs to send with this transaction
_json_encoder = msgspec.json.Encoder()


def _json_text(value: Any) -> str:
    return _json_encoder.encode(value).decode()


P = ParamSpec("P")
T = TypeVar("T")
CommitHook = Callable[[Any], None]


def _configure_sqlite(sync_engine: Engine, busy_timeout_ms: int, *, autocheckpoint: bool) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN is ours to emit.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # A group's members run in savepoints, whose undo journal SQLite otherwise moves
        # to a temporary file past 64 KiB: a file per group and tens of writes per request.
        cursor.execute("PRAGMA temp_store=MEMORY")
        # The writers' connection (the pool lends the one used last) keeps the pages it
        # writes at random places, the leaves of the per-user and per-key indexes, in
        # its cache rather than reading them back from the WAL: 16 MiB, not SQLite's
        # 2 MiB (a connection's cache fills only as it is used).
        cursor.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        if not autocheckpoint:  # Database._checkpoints does it, off the event loop
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        # A WAL that grew (a burst, a long read holding it) shrinks back to this when it
        # next starts over; SQLite otherwise keeps the file at its largest size forever.
        cursor.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def notify(db: Session, channel: str, payload: str = "") -> None:
    """PostgreSQL: NOTIFY ``channel`` when this transaction commits (a no-op on SQLite).

    A transaction's notifications go out in one statement just before its commit,
    rather than a round trip each; PostgreSQL delivers them only if it commits.
    """
    if db.get_bind().dialect.name == "postgresql":
        pending: dict[tuple[str, str], None] = db.info.setdefault(_NOTIFY_KEY, {})
        pending[(channel, payload)] = None


_NOTIFY_BATCH = 8
MAX_CACHED_STATEMENT = 128 * 1024  # bytes of SQL


def _notify_statement(count: int) -> Prepared:
    return Prepared(
        select(*(func.pg_notify(bindparam(f"c{i}"), bindparam(f"p{i}")) for i in range(count)))
    )


_NOTIFY_STATEMENTS = {n: _notify_statement(n) for n in range(1, _NOTIFY_BATCH + 1)}


def _send_notifications(session: Session) -> None:
    pending = list(session.info.pop(_NOTIFY_KEY, None) or ())
    for start in range(0, len(pending), _NOTIFY_BATCH):
        chunk = pending[start : start + _NOTIFY_BATCH]
        params: dict[str, str] = {}
        for i, (channel, payload) in enumerate(chunk):
            params[f"c{i}"], params[f"p{i}"] = channel, payload
        _NOTIFY_STATEMENTS[len(chunk)].execute(session, params)


_HOOKS_KEY = "tellback_commit_hooks"  # session.info: the Database's commit hooks


def _run_commit_hooks(session: Session) -> None:
    if session.in_nested_transaction():  # a SAVEPOINT released: the data is not committed
        return
    _run_hooks(session.info)


def _run_hooks(info: dict[Any, Any]) -> None:
    hooks: dict[str, CommitHook] = info.get(_HOOKS_KEY, {})
    for key, hook in hooks.items():
        value = info.pop(key, None)
        if value:
            hook(value)


def _drop_commit_keys(session: Session) -> None:
    for key in (*session.info.get(_HOOKS_KEY, {}), _NOTIFY_KEY):
        session.info.pop(key, None)


# A connection back in the pool less than this long ago is not pinged again at checkout
# (HikariCP's "alive bypass window" is the same idea, at 500 ms): under load a ping before
# every transaction is one round trip in a dozen, while a connection that died within the
# window fails its one statement with a lost connection (503), and SQLAlchemy then
# replaces every connection the pool held before it.
_PING_AFTER_IDLE_SECONDS = 0.5
_RETURNED_AT = "tellback_returned_at"  # connection record info: when it was last checked in


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info[_RETURNED_AT] = time.monotonic()


def _ping_at_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """PostgreSQL: a pooled connection the server dropped (restart, failover) is found at
    checkout and replaced, instead of failing requests until it is discarded.

    One round trip, and none for a connection that was in use a moment ago (unless
    asyncpg already saw it closed: a backend terminated by the server says so before
    it goes). SQLAlchemy's ``pool_pre_ping`` on asyncpg wraps its ping in a
    transaction (BEGIN, the ping, ROLLBACK): three before every transaction.
    """
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the pooled connection was closed")
    returned = record.info.get(_RETURNED_AT)
    if returned is not None and time.monotonic() - returned < _PING_AFTER_IDLE_SECONDS:
        return
    try:
        dbapi_connection.run_async(lambda connection: connection.fetchrow(";"))
    except Exception as exc:
        raise DisconnectionError("the pooled connection did not answer") from exc


class AfterGroupCommit(Exception):
    """Raised by a SQLite write-group member whose answer rests on what an earlier
    member of its group wrote (an idempotent replay of it, or the refusal of a key
    it took for another body): the member is undone at once, but the exception
    reaches its caller only once the group has committed, or as the commit's error,
    so it never answers from rows then lost."""


class Tx(ABC):
    """One open transaction; :meth:`run` calls ``fn(session, *args)`` inside it."""

    @abstractmethod
    async def run(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T: ...


class SessionTx(Tx):
    """A :class:`Tx` over an ``AsyncSession`` (PostgreSQL, and any ORM service's session)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def run(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await self.session.run_sync(fn, *args, **kwargs)


class WithInfo(Protocol):
    """A ``Session``, or anything else whose ``info`` the commit hooks read."""

    @property
    def info(self) -> dict[Any, Any]: ...


class LazyTx(Tx):
    """PostgreSQL: a pooled connection for statements that commit by themselves
    (:meth:`Prepared.fetch_alone`), and a session on it only once :meth:`run` needs one.

    The connection is checked out at the first statement (:meth:`connected`), not
    before: a request refused before it writes (a category the app does not accept)
    neither holds one nor waits for one when the database is down. What such statements
    leave for the commit hooks goes into :attr:`info`, as into a session's
    (``publish_at_commit`` and the like take either); the hooks run when the
    transaction ends, whatever happens after those statements, which had committed.
    A session costs about 60 us of CPU to open, commit and close even when it sends
    nothing, so a write that is all statements alone (a new feedback) goes without."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        engine: AsyncEngine,
        info: dict[Any, Any],
    ) -> None:
        self.connection: AsyncConnection | None = None
        self.session: AsyncSession | None = None
        self._engine = engine
        self._sessionmaker = sessionmaker
        self.info = info

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def connected(self) -> AsyncConnection:
        """The transaction's connection, checked out of the pool on the first call."""
        if self.connection is None:
            self.connection = await self._engine.connect()
        return self.connection

    async def run(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        if self.session is None:
            # Bound to the connection: its transaction begins on it (and commits with it).
            self.session = self._sessionmaker(bind=await self.connected())
        return await self.session.run_sync(fn, *args, **kwargs)

    async def close(self) -> None:
        """Close the session, if any, and return the connection to the pool (shielded,
        as ``AsyncConnection`` closes itself: a cancelled request still returns it)."""
        try:
            if self.session is not None:
                await self.session.close()
        finally:
            if self.connection is not None:
                await asyncio.shield(self.connection.close())


class _InlineTx(Tx):
    """SQLite: the sync ``Session``'s statements run right on the event loop's thread."""

    def __init__(self, session: Session) -> None:
        self.session = session

    async def run(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return fn(self.session, *args, **kwargs)


class Database:
    """The process's engines, session factories and (on SQLite) the writer lock."""

    def __init__(
        self, settings: Settings, *, pool_size: int | None = None, pool_timeout: float = 10
    ) -> None:
        self.url = settings.database_url
        self.is_sqlite = settings.is_sqlite
        kwargs: dict[str, Any] = {
            # JSON columns (a KiB of device context per feedback) through msgspec, not json.
            "json_serializer": _json_text,
            "json_deserializer": msgspec.json.decode,
            # A statement's error names its SQL but never its values (message bodies,
            # push tokens), which would otherwise reach the logs with its traceback.
            "hide_parameters": True,
        }
        self._sqlite_path = settings.sqlite_path
        if self._sqlite_path is not None:
            self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            # SQLAlchemy's aiosqlite dialect over a connection that runs on this thread.
            kwargs["async_creator"] = partial(inline_sqlite.connect, str(self._sqlite_path))
        elif self.is_sqlite:  # :memory: (schema tools, tests): plain aiosqlite
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # A fixed pool (HikariCP's advice): connections are opened as needed and then
            # kept. An overflow pool closes every connection returned while its idle ones
            # are full, so a steady load above its size opened and closed connections
            # all the time, each a new PostgreSQL backend with cold caches and statements
            # to prepare again (fixed: 15-37 % more creates/s at 32 connections).
            size = settings.database_pool_size if pool_size is None else pool_size
            # A request that waits longer for a connection is answered 503.
            kwargs.update(pool_size=size, max_overflow=0, pool_timeout=pool_timeout)
            # A database that does not answer within 5 s is an outage (503), not a hang.
            kwargs["connect_args"] = {
                "command_timeout": 30,
                "timeout": 5,
                # asyncpg prepares each statement once per connection, but only up to 15 KiB
                # of SQL; a batch of feedback (db/batch.py) is up to 62 KiB, and PostgreSQL
                # parsed and analyzed it anew on every run (test_batch checks the bound).
                "max_cacheable_statement_size": MAX_CACHED_STATEMENT,
            }
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if not self.is_sqlite:
            event.listen(self.engine.sync_engine, "checkout", _ping_at_checkout)
            event.listen(self.engine.sync_engine, "checkin", _note_checkin)
        # A Session subclass of our own, so commit hooks (job wake-ups) stay per process/app.
        self.session_class: type[Session] = type("TellbackSession", (Session,), {})
        # Names this process's sessions in cross-process notifications (events).
        self.instance = uuid.uuid4().hex[:16]
        # Each session's info carries the hooks, so the listeners (module functions) hold
        # no reference to this Database: SQLAlchemy keeps class-level listeners keyed
        # weakly by the class, and a listener that led back to the class would keep
        # every Database, its engines and their caches alive.
        self._hooks: dict[str, CommitHook] = {}
        # What every session's info starts from (each gets its own copy), as a LazyTx's does.
        self._info = info = {"instance": self.instance, _HOOKS_KEY: self._hooks}
        self.sessionmaker = async_sessionmaker(
            self.engine,
            expire_on_commit=False,
            sync_session_class=self.session_class,
            info=info,
        )
        # PostgreSQL reads run without BEGIN/COMMIT: at READ COMMITTED every statement has
        # its own snapshot either way, and a one-query read is then two round trips (the
        # checkout ping and the query) instead of six.
        self._read_sessionmaker = self.sessionmaker
        if not self.is_sqlite:
            self._read_sessionmaker = async_sessionmaker(
                self.engine.execution_options(isolation_level="AUTOCOMMIT"),
                expire_on_commit=False,
                sync_session_class=self.session_class,
                info=info,
            )
        event.listen(self.session_class, "before_commit", _send_notifications)
        event.listen(self.session_class, "after_commit", _run_commit_hooks)
        event.listen(self.session_class, "after_rollback", _drop_commit_keys)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._queued_writers = 0  # waiting for the write lock in _grouped
        self._group: _Group | None = None  # SQLite: the open, shared write transaction
        self._commit_observer: Callable[[int], None] | None = None  # (observe_commits)
        self.sync_engine: Engine | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        # Checkpoints get a thread of their own: the shared default pool also runs
        # uploads, FCM posts and media work, and the paused pass holds the write lock.
        self._checkpoint_thread = ThreadPoolExecutor(1, thread_name_prefix="tellback-checkpoint")
        self._wal = _WalState()
        self._closed = False
        if self._sqlite_path is not None:
            _configure_sqlite(self.engine.sync_engine, busy_timeout_ms=0, autocheckpoint=False)
        elif self.is_sqlite:
            _configure_sqlite(self.engine.sync_engine, busy_timeout_ms=30_000, autocheckpoint=True)
        if self._sqlite_path is not None:
            # The same file through the stdlib driver, used on the loop's thread (Tx.run).
            # Never a blocking wait: no busy timeout, and a pool that grows instead.
            self.sync_engine = create_engine(
                self.engine.url.set(drivername="sqlite+pysqlite"),
                connect_args={"timeout": 0, "check_same_thread": False},
                json_serializer=_json_text,
                json_deserializer=msgspec.json.decode,
                hide_parameters=True,
                pool_size=8,
                max_overflow=-1,
                # The connection used last goes out first: a connection's page cache is
                # dropped whenever another connection has written, so the writers' turns
                # reuse one warm cache instead of reading pages back in each time.
                pool_use_lifo=True,
            )
            _configure_sqlite(self.sync_engine, busy_timeout_ms=0, autocheckpoint=False)
            self.inline_sessionmaker = sessionmaker(
                self.sync_engine,
                class_=self.session_class,
                expire_on_commit=False,
                info=info,
            )

    # ----- commit hooks ---------------------------------------------------------------------

    def observe_commits(self, observer: Callable[[str, int], None]) -> None:
        """Call ``observer(kind, n)`` for every commit that carries the writes of several
        requests when they come together: ``sqlite_write_group`` (SQLite: every write
        request of this process), ``postgresql_new_feedback`` (PostgreSQL: new feedback,
        ``db/batch.py``). ``n`` is how many requests it carried, 1 when alone."""
        if self.is_sqlite:
            self._commit_observer = partial(observer, "sqlite_write_group")
        else:
            batch.observe(self.engine, partial(observer, "postgresql_new_feedback"))

    def on_commit(self, key: str, hook: CommitHook) -> None:
        """After a commit, call ``hook(info.pop(key))`` if the transaction set ``key``.

        A rolled-back transaction drops the key.
        """
        self._hooks[key] = hook

    # ----- sessions and transactions --------------------------------------------------------

    @asynccontextmanager
    async def session(self, *, write: bool) -> AsyncIterator[AsyncSession]:
        """A session whose transaction commits on success and rolls back on error."""
        if self._write_lock is not None and write:
            async with self._write_lock:
                self._commit_group()  # an open group commits before another writer begins
                async with self._open(write=True) as session:
                    yield session
        else:
            async with self._open(write=write) as session:
                yield session

    @asynccontextmanager
    async def _open(self, *, write: bool) -> AsyncIterator[AsyncSession]:
        async with (self.sessionmaker if write else self._read_sessionmaker)() as session:
            if self.is_sqlite and write:

                async def begin() -> None:
                    await session.connection(execution_options={_IMMEDIATE: True})

                await _when_unlocked(begin, session.rollback)
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise
        if self.is_sqlite and write:
            self._wrote()

    def transaction(self, *, write: bool, lazy: bool = False) -> AbstractAsyncContextManager[Tx]:
        """A transaction for sync functions of a ``Session``: commits on success. With
        ``lazy`` on PostgreSQL, a :class:`LazyTx` (its session opened only if needed).

        (The context manager of the kind this database runs, handed out as it is: one
        generator fewer to step through on every request.)"""
        if self.sync_engine is None:
            if lazy and not self.is_sqlite:
                return self._lazy_tx()
            return self._session_tx(write=write)
        if self._write_lock is not None and write:
            return self._grouped()
        return self._inline_read()

    @asynccontextmanager
    async def _session_tx(self, *, write: bool) -> AsyncIterator[Tx]:
        async with self.session(write=write) as session:
            yield SessionTx(session)

    @asynccontextmanager
    async def _lazy_tx(self) -> AsyncIterator[Tx]:
        tx = LazyTx(self.sessionmaker, self.engine, dict(self._info))
        try:
            yield tx
            if tx.session is not None:
                await tx.session.commit()
        except BaseException:
            if tx.session is not None:
                await tx.session.rollback()
            raise
        finally:
            try:
                await tx.close()
            finally:
                _run_hooks(tx.info)  # (what committed alone is there whatever came after)

    @asynccontextmanager
    async def _inline_read(self) -> AsyncIterator[Tx]:
        """SQLite: a read on the loop's thread (writes go through :meth:`_grouped`).

        No lock to wait for: the transaction begins deferred, and in WAL mode a
        reader does not wait for the writer."""
        with self.inline_sessionmaker() as session:
            session.connection()
            try:
                yield _InlineTx(session)
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @asynccontextmanager
    async def _grouped(self) -> AsyncIterator[Tx]:
        """SQLite: a write transaction that shares its COMMIT with the writers queued behind it.

        Writers of this process take turns on the write lock. Whoever finds the next
        writer already waiting leaves the transaction open for it instead of committing;
        the last of such a group commits for all, and each member returns only after
        that commit. Each member after the first runs in a SAVEPOINT, so one that fails
        is undone alone. A COMMIT appends every page the transaction changed to the WAL,
        and consecutive writers change mostly the same pages (the newest end of each
        table and index): one COMMIT per group writes them once.
        """
        assert self._write_lock is not None
        await self._take_write_lock(self._write_lock)
        failure: BaseException | None = None
        try:
            group = self._group or await self._open_group()
            try:
                member = _Member.join(group, self._hooks)
            except BaseException as exc:
                self._abort_group(group, exc)
                raise
            try:
                yield _InlineTx(group.session)
                member.finish()
            except BaseException as exc:  # noqa: BLE001 (raised below, once the lock is free)
                failure = exc
                self._undo(group, member, exc)
            await self._hand_over(group)
        finally:
            self._write_lock.release()
        if failure is not None:
            if isinstance(failure, AfterGroupCommit) and member.nested:
                await asyncio.shield(group.committed)
            raise failure
        await asyncio.shield(group.committed)

    async def _take_write_lock(self, lock: asyncio.Lock) -> None:
        self._queued_writers += 1
        try:
            await lock.acquire()
        except BaseException:  # cancelled while queued: the open group must not wait for us
            self._queued_writers -= 1
            if self._group is not None:
                asyncio.get_running_loop().call_soon(self._commit_if_idle, self._group)
            raise
        self._queued_writers -= 1

    def _undo(self, group: _Group, member: _Member, exc: BaseException) -> None:
        """Undo a failed member: its savepoint, or (the first member) the whole group."""
        if not member.nested:
            self._abort_group(group, exc)
            return
        try:
            member.undo()
        except BaseException as broken:
            self._abort_group(group, broken)
            raise

    async def _hand_over(self, group: _Group) -> None:
        """Commit the group, or leave it open for the writer queued next."""
        try:
            if self._group is group and group.members < _GROUP_MAX:
                # Statements here never wait, so nobody queues while a writer works:
                # one turn of the loop lets the requests that are ready reach the lock.
                await asyncio.sleep(0)
        finally:
            if self._group is group:
                if not self._queued_writers or group.members >= _GROUP_MAX:
                    self._commit_group()
                else:  # the next writer joins; should it give up waiting, commit anyway
                    asyncio.get_running_loop().call_soon(self._commit_if_idle, group)

    async def _open_group(self) -> _Group:
        session = self.inline_sessionmaker()

        async def begin() -> None:
            session.connection(execution_options={_IMMEDIATE: True})

        async def reset() -> None:
            session.rollback()

        try:
            await _when_unlocked(begin, reset)
        except BaseException:
            session.close()
            raise
        self._group = _Group(session, asyncio.get_running_loop().create_future())
        return self._group

    def _commit_group(self) -> None:
        """Commit the open group, if any (the caller holds the write lock or nobody does)."""
        group, self._group = self._group, None
        if group is None:
            return
        try:
            group.session.commit()
        except BaseException as exc:  # noqa: BLE001 (each member raises it)
            try:
                group.session.rollback()
            finally:  # the members never wait for ever
                _fail(group.committed, exc)
        else:
            group.committed.set_result(None)
            if self._commit_observer is not None:
                self._commit_observer(group.members)
        finally:
            group.session.close()
            self._wrote()

    def _commit_if_idle(self, group: _Group) -> None:
        """Commit ``group`` unless a writer holds the lock or is about to take it."""
        lock = self._write_lock
        idle = lock is not None and not lock.locked() and not self._queued_writers
        if self._group is group and idle:
            self._commit_group()

    def _abort_group(self, group: _Group, exc: BaseException) -> None:
        if self._group is group:
            self._group = None
        try:
            group.session.rollback()
        finally:
            group.session.close()
            _fail(group.committed, exc)

    def _wrote(self) -> None:
        """A write transaction committed: the WAL wants checkpointing soon."""
        if self._sqlite_path is None or self._closed:
            return
        self._wal.unchecked_commits += 1
        if self._checkpointer is None:
            # A module function with its own state: the task never holds the Database.
            self._checkpointer = asyncio.create_task(
                _checkpoints(
                    self._sqlite_path, self._wal, weakref.ref(self), self._checkpoint_thread
                )
            )

    async def _checkpoint_paused(self, path: Path) -> None:
        """Copy back what the WAL gained since the last pass, with this process's writers
        paused: the next writer then finds all of it copied and starts the WAL over.

        SQLite starts the WAL over only for a write transaction that begins once every
        frame is copied back. Writers queued back to back never did (each began before
        the checkpoint could catch up), so under sustained writes the WAL grew by every
        commit, hundreds of MB a minute, and each write extended the file: new blocks
        the kernel zeroes first, half of a COMMIT's cost."""
        assert self._write_lock is not None
        if self._closed or (not self._wal.unchecked_commits and self._group is None):
            return  # nothing written since the pass: the next writer starts the WAL over
        async with self._write_lock:
            self._commit_group()
            self._wal.unchecked_commits = 0
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._checkpoint_thread, _checkpoint, path)

    async def dispose(self) -> None:
        self._commit_group()
        self._closed = True
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.cancel()
            await asyncio.wait([checkpointer])  # (raising nothing, it leaves no traceback)
        self._checkpoint_thread.shutdown(wait=False)  # a running checkpoint finishes alone
        await self.engine.dispose()
        if self.sync_engine is not None:
            self.sync_engine.dispose()


_CHECKPOINT_SECONDS = 0.25
_WAL_SIZE_LIMIT = 64 << 20  # bytes: journal_size_limit
_CACHE_KIB = 16 << 10  # each SQLite connection's page cache at most
_GROUP_MAX = 64  # writers sharing one COMMIT at most


@dataclass
class _Group:
    session: Session
    committed: asyncio.Future[None]
    members: int = 0


@dataclass
class _Member:
    """One writer's part of a group: after the first, in a SAVEPOINT of its own.

    The savepoint is plain SQL on the group's connection rather than the ORM's
    ``begin_nested()``: the ORM fires ``after_commit`` when a nested transaction is
    released, which would hand a member's events and jobs to the commit hooks before
    the group's COMMIT (and costs a few percent of a request in state bookkeeping).
    """

    session: Session
    nested: bool
    info: dict[str, Any]  # session.info before this member: what its commit hooks added

    @classmethod
    def join(cls, group: _Group, hooks: dict[str, CommitHook]) -> _Member:
        session, first = group.session, not group.members
        group.members += 1
        if first:  # a first member that fails rolls back the whole transaction
            return cls(session, False, {})
        info = {  # lists and dicts copied: the pending events, jobs, ...
            k: v if v is hooks or not isinstance(v, list | dict | set) else type(v)(v)
            for k, v in session.info.items()
        }
        _sql(session, "SAVEPOINT tellback_member")
        return cls(session, True, info)

    def finish(self) -> None:
        self.session.flush()  # this member's ORM changes fail here, not in the next one's
        if self.nested:
            _sql(self.session, "RELEASE SAVEPOINT tellback_member")

    def undo(self) -> None:
        """Undo this member's statements; raises if the transaction itself is gone
        (then the whole group is aborted)."""
        assert self.nested
        _sql(self.session, "ROLLBACK TO SAVEPOINT tellback_member")
        _sql(self.session, "RELEASE SAVEPOINT tellback_member")
        # The ORM's view of rows this member flushed no longer holds; earlier members'
        # objects are flushed and no longer needed by the group.
        self.session.expunge_all()
        self.session.info.clear()
        self.session.info.update(self.info)


def _sql(session: Session, statement: str) -> None:
    _, raw = raw_connection(session)
    raw.execute(statement)


def _fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, Exception):
        future.set_exception(exc)
        future.exception()  # (retrieved: each member that waits raises it)
    else:
        future.cancel()


@dataclass
class _WalState:
    unchecked_commits: int = 0


async def _checkpoints(
    path: Path, wal: _WalState, database: weakref.ref[Database], thread: ThreadPoolExecutor
) -> None:
    """Checkpoint the WAL in a thread, a few times a second while there are writes.

    SQLite's automatic checkpoint runs inside a COMMIT once the WAL passes 1,000
    pages: on the loop's thread that would stall every request for the copy and
    its fsync. Here a PASSIVE checkpoint (never waits for, nor blocks, readers or
    writers) runs on a thread of its own instead, copying the bulk while writers go
    on. If they wrote meanwhile, a second pass copies the rest with this process's
    writers paused (:meth:`Database._checkpoint_paused`), so that the WAL starts over.
    An error is logged and the next round tries again: with SQLite's own checkpoints
    off, a checkpointer that stopped would let the WAL grow without bound.
    """
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(_CHECKPOINT_SECONDS)
        if not wal.unchecked_commits:
            continue
        wal.unchecked_commits = 0
        try:
            # The thread owns its connection from open to close: a cancelled wait here
            # (shutdown) never closes a connection that is still checkpointing.
            await loop.run_in_executor(thread, _checkpoint, path)
            if not await _paused_pass(database, path):
                return  # collected without dispose(): nothing writes here any more
        except Exception:
            log.exception("sqlite.checkpoint_failed")


async def _paused_pass(database: weakref.ref[Database], path: Path) -> bool:
    """:meth:`Database._checkpoint_paused`, if the Database still exists (the reference
    ends with this call: the checkpointer holds none while it sleeps)."""
    db = database()
    if db is None:
        return False
    await db._checkpoint_paused(path)
    return True


def _checkpoint(path: Path) -> None:
    try:
        connection = sqlite3.connect(path, timeout=0)
    except sqlite3.Error as exc:
        log.debug("sqlite.checkpoint_skipped", error=str(exc))
        return
    try:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.Error as exc:  # e.g. busy with another checkpoint: the next round
        log.debug("sqlite.checkpoint_skipped", error=str(exc))
    finally:
        connection.close()


_LOCK_WAIT_SECONDS = 30.0


async def _when_unlocked(
    begin: Callable[[], Awaitable[None]], reset: Callable[[], Awaitable[None]]
) -> None:
    """Open a SQLite transaction; while another process holds the write lock, retry
    with ``asyncio.sleep`` (up to 30 s) instead of blocking the loop in a busy wait."""
    delay, waited = 0.001, 0.0
    while True:
        try:
            await begin()
        except OperationalError as exc:
            if "locked" not in str(exc).lower() or waited >= _LOCK_WAIT_SECONDS:
                raise
        else:
            return
        await reset()  # hand the connection back; the next try starts afresh
        await asyncio.sleep(delay)
        waited += delay
        delay = min(delay * 2, 0.05)
