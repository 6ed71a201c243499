"""Fixed statements for the hot paths, compiled once and run on the driver's cursor.

``Session.execute`` spends roughly 100 us of Python per statement on work a
fixed statement does not need again: the compiled-cache lookup, building the
execution context, parameter processing, result metadata. Sending feedback runs
about eight such statements, which made SQLAlchemy the largest cost of the
request (``tests/bench/bench_ingest.py``). A :class:`Prepared` statement is
compiled by SQLAlchemy once per dialect and then executed directly on the DBAPI
cursor of the session's own connection -- in the session's transaction, with the
column types' own bind processors, so the stored values are byte-for-byte what
the ORM would store; the values a SELECT or RETURNING gives back go through the
types' result processors. Constants in the statement (``LIMIT 1``, ``== "done"``)
keep their values; every other parameter is passed by name. On PostgreSQL a statement
can also run by itself, committing alone, with no transaction around it
(:meth:`Prepared.fetch_alone`): a new feedback is two such statements.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from uuid import UUID, SafeUUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import Select, Table, bindparam, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.types import TypeEngine

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    # (index, result processor) of each selected or returned column that has one
    converted: tuple[tuple[int, Callable[[Any], Any]], ...]
    constants: dict[str, Any]  # parameters whose value is part of the statement


class Prepared:
    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, str], _Compiled] = {}

    def _for(self, dialect: Dialect) -> _Compiled:
        # Keyed by kind, not instance: every engine here is configured alike (db/engine.py),
        # and a cache per engine would keep each one's dialect alive for good.
        key = (dialect.name, dialect.driver)
        compiled = self._compiled.get(key)
        if compiled is None:
            c = self.statement.compile(dialect=dialect)
            assert isinstance(c, SQLCompiler)
            names = tuple(c.positiontup or ())
            processors = tuple(_bind_processor(c.binds[n].type, dialect) for n in names)
            columns: Iterable[Any] = ()
            if isinstance(self.statement, Select):
                columns = self.statement.selected_columns
            elif isinstance(self.statement, UpdateBase) and self.statement._returning:
                columns = self.statement.exported_columns
            results = (_result_processor(col.type, dialect) for col in columns)
            converted = tuple((i, p) for i, p in enumerate(results) if p is not None)
            constants = {n: c.binds[n].effective_value for n in names if not c.binds[n].required}
            compiled = _Compiled(c.string, names, processors, converted, constants)
            self._compiled[key] = compiled
        return compiled

    def parameters(self, dialect: Dialect) -> tuple[str, ...]:
        """The names of the parameters a caller passes (not the constants), each once."""
        c = self._for(dialect)
        return tuple(dict.fromkeys(n for n in c.names if n not in c.constants))

    def execute(self, db: Session, params: Mapping[str, Any]) -> list[Any]:
        """Run in ``db``'s transaction; the rows it returns, if any.

        The values a SELECT or ``RETURNING`` gives are converted by the column
        types, as ``Session.execute`` would.
        """

        def fetch(cursor: Any, c: _Compiled) -> list[Any]:
            cursor.execute(c.sql, _args(c, params))
            return list(cursor.fetchall()) if cursor.description else []

        c, rows = self._on_cursor(db, fetch)
        return _converted(c, rows)

    async def fetch_alone(
        self, connection: AsyncConnection, params: Mapping[str, Any]
    ) -> list[Any]:
        """PostgreSQL: run as a statement of its own, which commits by itself, on
        ``connection``'s asyncpg connection; the rows it returns, converted as
        :meth:`execute` converts them.

        One round trip where a transaction adds two (BEGIN, COMMIT), and no hand-off
        to SQLAlchemy's greenlet. The connection must have no transaction open on the
        server (nothing run through the session yet): the statement goes past the
        adapter that would begin one. A driver error is raised as SQLAlchemy's.
        """
        dialect = connection.dialect
        c = self._for(dialect)
        adapted = (await _pooled(connection)).dbapi_connection
        if adapted is None or adapted._started:
            raise RuntimeError("fetch_alone needs a connection with no transaction open")
        try:
            rows = await adapted.driver_connection.fetch(c.sql, *_args(c, params))
        except Exception as exc:
            try:
                adapted._handle_exception(exc)  # raises the adapter's DBAPI error for it
            except dialect.loaded_dbapi.Error as translated:
                error = _wrapped(dialect, adapted, None, c.sql, translated)
                if _lost(error, dialect):
                    with contextlib.suppress(Exception):  # (error is what is raised)
                        await connection.invalidate(translated)
                raise error from exc
            raise
        return _converted(c, rows)

    def execute_many(self, db: Session, rows: Iterable[Mapping[str, Any]]) -> None:
        """Run once per row, in one driver call (``executemany``); no results."""
        self._on_cursor(
            db, lambda cursor, c: cursor.executemany(c.sql, [_args(c, row) for row in rows])
        )

    def _on_cursor(self, db: Session, run: Callable[[Any, _Compiled], T]) -> tuple[_Compiled, T]:
        """``run(cursor, compiled)`` on a cursor of ``db``'s connection, closed after; a
        driver error is raised as SQLAlchemy's."""
        dialect, raw = raw_connection(db)
        c = self._for(dialect)
        cursor = raw.cursor()
        try:
            return c, run(cursor, c)
        except dialect.loaded_dbapi.Error as exc:
            error = _wrapped(dialect, raw, cursor, c.sql, exc)
            if _lost(error, dialect):
                _invalidate(db, exc)
            raise error from exc
        finally:
            cursor.close()


async def _pooled(connection: AsyncConnection) -> PoolProxiedConnection:
    """``connection.get_raw_connection()``, without its hand-off to a greenlet (about
    10 us) when the connection is open and valid: then reading it does no I/O."""
    sync = connection.sync_connection
    if sync is not None and not sync.closed and not sync.invalidated:
        return sync.connection
    return await connection.get_raw_connection()


def _converted(c: _Compiled, rows: list[Any]) -> list[Any]:
    """``rows`` with the column types' result processors applied."""
    if not c.converted:
        return rows
    converted = []
    for row in rows:
        values = list(row)
        for i, p in c.converted:
            values[i] = p(values[i])
        converted.append(tuple(values))
    return converted


def _wrapped(dialect: Dialect, raw: Any, cursor: Any, sql: str, exc: Exception) -> Exception:
    """The driver's error as ``Session.execute`` raises it: SQLAlchemy's ``IntegrityError``,
    ``OperationalError``, ... (what the error handlers and callers expect), marked as a
    lost connection when it is one."""
    return DBAPIError.instance(
        sql,
        None,
        exc,
        dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=dialect.is_disconnect(cast(Any, exc), raw, cursor),
        dialect=dialect,
    )


def _lost(error: Exception, dialect: Dialect) -> bool:
    """Whether ``error`` (from :func:`_wrapped`) says a PostgreSQL connection is gone.
    Then it is invalidated, as ``Session.execute`` would: the pool replaces it rather
    than lending it out again (a connection back a moment ago is not pinged at
    checkout, so under steady traffic a dead one failed every request it was lent
    to). Only this connection: another that died unseen costs its own one request.
    (SQLite has no server to lose; a write group's shared connection stays as it is.)"""
    lost = bool(getattr(error, "connection_invalidated", False))
    return lost and dialect.name != "sqlite"


def _invalidate(db: Session, exc: Exception) -> None:
    """Invalidate the connection of ``db``'s transaction, never hiding ``exc``: a
    transaction already unusable refuses to hand its connection out (then the checkout,
    which finds the connection closed, replaces it)."""
    cached = db.info.get(_RAW)
    with contextlib.suppress(Exception):  # (exc is what the caller raises)
        (cached[3] if cached is not None else db.connection()).invalidate(exc)


# session.info: (transaction, dialect, DBAPI connection, SQLAlchemy connection)
_RAW = "tellback_raw_connection"


def raw_connection(db: Session) -> tuple[Dialect, Any]:
    """The DBAPI connection of ``db``'s current transaction (looked up once per transaction)."""
    transaction = db.get_transaction()
    cached = db.info.get(_RAW)
    if cached is not None and transaction is not None and cached[0] is transaction:
        return cached[1], cached[2]
    connection = db.connection()
    raw = connection.connection.dbapi_connection
    db.info[_RAW] = (db.get_transaction(), connection.dialect, raw, connection)
    return connection.dialect, raw


def _args(c: _Compiled, params: Mapping[str, Any]) -> list[Any]:
    if c.constants:
        params = {**c.constants, **params}
    return [
        params[n] if process is None else process(params[n])
        for n, process in zip(c.names, c.processors, strict=True)
    ]


# Bind processors of types whose values repeat within a transaction (one ``now`` in every
# created_at/updated_at, one id as a key and again as a foreign key), shared by every
# statement of a dialect kind and remembering their last value: converting a datetime to
# SQLite's text or a UUID to its stored form is a chain of Python calls each time.
_MEMOIZED: dict[tuple[str, str, str], Callable[[Any], Any] | None] = {}


def _bind_processor(type_: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    chain = type_.dialect_impl(dialect).bind_processor(dialect)
    if chain is None or not isinstance(type_, GUID | DateTimeUTC):
        return chain
    if isinstance(type_, GUID) and type_.binary and dialect.name == "sqlite":
        return _uuid_bytes(chain)
    if isinstance(type_, GUID) and dialect.driver == "asyncpg":
        return _uuid_as_is(chain)
    processor: Callable[[Any], Any] = chain
    if isinstance(type_, DateTimeUTC) and dialect.name == "sqlite":
        processor = _utc_text(chain)
    key = (dialect.name, dialect.driver, repr(type_))
    if key not in _MEMOIZED:
        _MEMOIZED[key] = _remembering_last(processor)
    return _MEMOIZED[key]


def _result_processor(type_: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """The column type's result processor; on SQLite, for a GUID or a DateTimeUTC, one
    that converts the stored form directly (a list page reads hundreds of each)."""
    chain = type_.dialect_impl(dialect).result_processor(dialect, None)
    if chain is None or dialect.name != "sqlite":
        return chain
    if isinstance(type_, GUID) and type_.binary:
        return _uuid_from_bytes(chain)
    if isinstance(type_, DateTimeUTC):
        return _utc_from_text(chain)
    return chain


def _uuid_from_bytes(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """SQLite's GUID: its 16 stored bytes straight to a ``uuid.UUID`` (0.26 us a value
    against the type's 0.9); anything else (None, a text id) through the type's chain.

    The UUID is made as ``UUID.__init__`` makes one, without its argument checks: the
    128-bit ``int`` it holds, and ``is_safe`` unknown. Equal, hashing and printing
    alike to ``UUID(bytes=...)`` (``tests/server/test_prepared.py`` checks)."""
    new, set_, from_bytes, unknown = (
        object.__new__,
        object.__setattr__,
        int.from_bytes,
        SafeUUID.unknown,
    )

    def process(value: Any) -> Any:
        if value.__class__ is not bytes or len(value) != 16:
            return processor(value)
        uuid = new(UUID)
        set_(uuid, "int", from_bytes(value, "big"))
        set_(uuid, "is_safe", unknown)
        return uuid

    return process


def _utc_from_text(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """SQLite's DateTimeUTC: the stored text (``YYYY-MM-DD HH:MM:SS[.ffffff]``, in UTC)
    straight to an aware datetime with ``datetime.fromisoformat`` (0.08 us a value
    against the type's 0.8); anything else through the type's chain."""
    fromisoformat = dt.datetime.fromisoformat

    def process(value: Any) -> Any:
        if value.__class__ is str and len(value) in (19, 26):
            try:
                return fromisoformat(value + "+00:00")
            except ValueError:
                pass
        return processor(value)

    return process


def _uuid_bytes(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """SQLite's GUID: a ``uuid.UUID`` straight to its 16 bytes, the BLOB the type's own
    chain stores (through a ``memoryview``, 0.4 us a value against 0.1); anything else
    (a hex string, None) through that chain."""

    def process(value: Any) -> Any:
        if value.__class__ is UUID:
            return value.bytes
        return processor(value)

    return process


def _uuid_as_is(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """asyncpg's GUID: a ``uuid.UUID`` as it is, which asyncpg writes from its 16 bytes;
    the type's own chain makes it a string (``str(uuid)``, about 1 us) that asyncpg then
    parses back. Anything else (a text id, None) through that chain."""

    def process(value: Any) -> Any:
        if value.__class__ is UUID:
            return value
        return processor(value)

    return process


def _utc_text(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """SQLite's DateTimeUTC: a datetime already in UTC straight to the text the type's
    own chain stores, ``YYYY-MM-DD HH:MM:SS.ffffff`` (0.85 us against 1.3); any other
    value through that chain (which converts it to UTC first)."""

    def process(value: Any) -> Any:
        if value.__class__ is dt.datetime and value.tzinfo is dt.UTC:
            return value.isoformat(" ", "microseconds")[:26]  # (without "+00:00")
        return processor(value)

    return process


def _remembering_last(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``processor`` that answers a repeat of its last (immutable) value from memory."""
    last: tuple[Any, Any] = (object(), None)

    def process(value: Any) -> Any:
        nonlocal last
        seen = last  # one read: a tuple is replaced whole, never changed
        if seen[0] is value:
            return seen[1]
        out = processor(value)
        last = (value, out)
        return out

    return process


def insert_into(table: Table, columns: Iterable[str], *, returning: str | None = None) -> Prepared:
    """``INSERT INTO table (columns) VALUES (...)``, optionally ``RETURNING`` one column."""
    stmt = insert(table).values({k: bindparam(k, type_=table.c[k].type) for k in columns})
    if returning is not None:
        stmt = stmt.returning(table.c[returning])
    return Prepared(stmt)
