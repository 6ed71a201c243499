"""PostgreSQL: one statement's runs from concurrent requests, sent together.

A new feedback on PostgreSQL ends in one statement that writes everything and
commits by itself (``domain/conversations/services.py``). Under load most of what
such a statement costs is not its rows but its round trip and its commit: the
protocol on both sides, the socket wake-ups, the WAL flush, the NOTIFY signals.
:class:`Batched` sends the runs that arrive while earlier ones are in flight as one
statement (the same writes repeated, one copy per request, each with its own
parameters), which commits them together: group commit, as the SQLite writer does
it with its write groups (``db/engine.py``).

A request never waits for others to arrive: when a *lane* is free (at most
``lanes`` statements in flight) it goes at once, with whoever is waiting; only
when every lane is busy does it wait, and then it goes with the next statement,
as many as waited, rounded down to one of ``sizes`` (a statement per size, each
prepared once per connection). At low load every run is alone, as before.

A request hands over where its connection comes from (:class:`Source`, a ``LazyTx``),
not a connection: only the one that sends a statement takes one from the pool, so the
requests it carries never check one out, nor wait for one.

One statement is one transaction. When PostgreSQL refuses it (a constraint, a row
gone), it wrote nothing for any of its requests: each then runs its own copy alone,
on a connection of its own, so that a request's failure is its own again (the leader
keeps the error if its connection was lost with it). When the statement's answer
never came (the connection dropped), whether it committed is unknown, for every
request in it: each gets the error, as a request alone would, and a retry with its
``Idempotency-Key`` finds out.

Each statement that commits is reported, with how many requests it carried, to the
observer registered for its engine (:func:`observe`): the Prometheus histogram
``tellback_db_commit_size``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tellback_server.db.prepared import Prepared

# engine -> called with the number of requests of each statement that committed
_observers: weakref.WeakKeyDictionary[Any, Callable[[int], None]] = weakref.WeakKeyDictionary()


def observe(engine: AsyncEngine, observer: Callable[[int], None]) -> None:
    """Call ``observer(n)`` for every statement on ``engine`` that commits the writes of
    ``n`` requests."""
    _observers[engine.sync_engine] = observer


def member_name(index: int, name: str) -> str:
    """The name under which request ``index`` of a batch passes parameter ``name``."""
    return f"m{index}_{name}"


class Source(Protocol):
    """Where a request's connection comes from (``db/engine.py``'s ``LazyTx``)."""

    @property
    def engine(self) -> AsyncEngine: ...

    async def connected(self) -> AsyncConnection:
        """The request's connection, with no transaction open on it, checked out of the
        pool on the first call."""
        ...


class _Lead:
    """A waiting request's turn to send the next statement, with a lane handed to it."""


class _Alone:
    """The statement a waiting request went in failed: run alone."""


_LEAD, _ALONE = _Lead(), _Alone()


@dataclass(slots=True, eq=False)
class _Waiting:
    params: Mapping[str, Any]
    source: Source
    outcome: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batched:
    """Runs of one statement from concurrent requests, ``sizes[-1]`` at most together.

    ``build(n)`` makes the statement for ``n`` requests: request ``i``'s parameters
    named :func:`member_name` ``(i, name)``, except those named in ``shared``, which
    are the same for every request (the first one's are used); every row it returns
    starts with the index of the request it belongs to. ``build(1)`` is what a
    request runs alone.
    """

    def __init__(
        self,
        build: Callable[[int], Prepared],
        *,
        shared: Sequence[str] = (),
        sizes: Sequence[int] = (1, 4, 16),
        lanes: int = 2,
    ) -> None:
        assert sizes[0] == 1
        assert list(sizes) == sorted(set(sizes))
        self._statements = {n: build(n) for n in sizes}
        self._sizes = sizes
        self._shared = frozenset(shared)
        self._lanes = lanes
        # By (size, dialect kind): the statement's parameter names and, for each, the
        # request and name it comes from.
        self._plans: dict[tuple[int, str, str], tuple[tuple[str, ...], tuple[Any, ...]]] = {}
        # Requests batch only with others of the same database and event loop.
        self._queues: weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary[Any, _Queue]]
        self._queues = weakref.WeakKeyDictionary()

    def _queue(self, source: Source) -> _Queue:
        engine = source.engine.sync_engine
        by_loop = self._queues.get(engine)
        if by_loop is None:
            by_loop = self._queues[engine] = weakref.WeakKeyDictionary()
        loop = asyncio.get_running_loop()
        queue = by_loop.get(loop)
        if queue is None:
            queue = by_loop[loop] = _Queue()
        return queue

    async def fetch(self, source: Source, params: Mapping[str, Any]) -> list[Any]:
        """Run with ``params``, alone or with others, on ``source``'s connection if this
        request sends the statement; the rows that belong to this request, without the
        index."""
        queue = self._queue(source)
        if queue.running < self._lanes:
            queue.running += 1
            return await self._lead(queue, _Waiting(params, source))
        me = _Waiting(params, source)
        queue.waiting.append(me)
        try:
            # (shielded: a cancelled request leaves its outcome to be set, as below)
            outcome = await asyncio.shield(me.outcome)
        except asyncio.CancelledError:
            if me in queue.waiting:  # not taken yet: it will not be
                queue.waiting.remove(me)
            elif _handed_a_lane(me.outcome):
                queue.release()  # the lane handed to it goes to the next one
            # else it is in a statement under way: written, or not, without it
            raise
        if outcome is _LEAD:
            return await self._lead(queue, me)
        if outcome is _ALONE:
            return await self.alone(await source.connected(), params)
        rows: list[Any] = outcome
        return rows

    async def _lead(self, queue: _Queue, first: _Waiting) -> list[Any]:
        """Send ``first`` and the requests waiting behind it (holding a lane)."""
        batch = [first]
        try:
            size = max(n for n in self._sizes if n <= 1 + len(queue.waiting))
            while len(batch) < size:
                batch.append(queue.waiting.popleft())
            if len(batch) == 1:
                return await self.alone(await first.source.connected(), first.params)
            return await self._send(batch)
        finally:
            for member in batch[1:]:  # (a safety net: _send settles each of them)
                if not member.outcome.done():
                    member.outcome.set_exception(RuntimeError("a batch's outcome was lost"))
            queue.release()

    async def _send(self, batch: list[_Waiting]) -> list[Any]:
        """One statement for ``batch``; every request but the first learns its outcome
        through its future, the first's rows are returned."""
        first, others = batch[0], batch[1:]
        try:
            connection = await first.source.connected()
        except Exception as exc:
            _settle(others, exc)  # no connection (the database down): theirs too, at once
            raise
        except BaseException:
            _settle(others, _ALONE)  # (cancelled) nothing was sent
            raise
        try:
            statement = self._statements[len(batch)]
            params = self._params([m.params for m in batch], connection.dialect)
        except BaseException:
            _settle(others, _ALONE)  # nothing was sent
            raise
        task = asyncio.ensure_future(statement.fetch_alone(connection, params))
        cancelled = await _wait_out(task)
        error = task.exception()
        if error is None:
            _observed(connection, len(batch))
            mine: list[list[Any]] = [[] for _ in batch]
            for row in task.result():
                mine[row[0]].append(tuple(row[1:]))
            for member, its_rows in zip(others, mine[1:], strict=True):
                member.outcome.set_result(its_rows)
        elif _refused(error):
            _settle(others, _ALONE)  # its one transaction wrote nothing
        else:
            # No answer: whether it committed is unknown, as for a request alone that
            # lost its connection. Running again could write twice.
            _settle(others, error)
        if cancelled:
            raise asyncio.CancelledError
        if error is None:
            return mine[0]
        if not _refused(error) or getattr(error, "connection_invalidated", False):
            raise error  # (only this request's connection is gone if it was refused)
        return await self.alone(connection, first.params)

    def _params(self, members: list[Mapping[str, Any]], dialect: Dialect) -> dict[str, Any]:
        """The statement's parameters: each request's own under its member name."""
        key = (len(members), dialect.name, dialect.driver)
        plan = self._plans.get(key)
        if plan is None:
            names = self._statements[len(members)].parameters(dialect)
            plan = self._plans[key] = (names, tuple(self._source(name) for name in names))
        names, sources = plan
        return dict(zip(names, [members[i][k] for i, k in sources], strict=True))

    def _source(self, name: str) -> tuple[int, str]:
        """Which request's parameter (index, own name) the statement's ``name`` is."""
        if name in self._shared:
            return 0, name  # (the first request's)
        index, _, own = name[1:].partition("_")
        assert name == member_name(int(index), own)
        return int(index), own

    async def alone(self, connection: AsyncConnection, params: Mapping[str, Any]) -> list[Any]:
        """Run with ``params`` on ``connection`` by itself, never with others."""
        named = self._params([params], connection.dialect)
        rows = await self._statements[1].fetch_alone(connection, named)
        _observed(connection, 1)
        return [tuple(row[1:]) for row in rows]


class _Queue:
    """The lanes of one database in one event loop, and the requests waiting for one."""

    __slots__ = ("running", "waiting")

    def __init__(self) -> None:
        self.running = 0  # lanes taken: statements in flight, or handed to a waiting request
        self.waiting: deque[_Waiting] = deque()

    def release(self) -> None:
        """Hand a lane to the first request waiting, or free it."""
        while self.waiting:
            waiting = self.waiting.popleft()
            if not waiting.outcome.done():
                waiting.outcome.set_result(_LEAD)
                return
        self.running -= 1


def _settle(members: list[_Waiting], outcome: Any) -> None:
    """Set ``outcome`` (an exception is raised to them) for each of ``members``."""
    for member in members:
        if isinstance(outcome, BaseException):
            member.outcome.set_exception(outcome)
        else:
            member.outcome.set_result(outcome)


def _refused(error: BaseException) -> bool:
    """Whether PostgreSQL answered the statement with an error: then its transaction
    wrote nothing. A connection exception (SQLSTATE class 08, which asyncpg also
    raises itself when the connection drops) or a failure with no SQLSTATE at all (a
    timeout) leaves the outcome unknown."""
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    return isinstance(sqlstate, str) and not sqlstate.startswith("08")


def _observed(connection: AsyncConnection, requests: int) -> None:
    """Report a statement that committed the writes of ``requests`` requests."""
    observer = _observers.get(connection.sync_engine)
    if observer is not None:
        observer(requests)


def _handed_a_lane(outcome: asyncio.Future[Any]) -> bool:
    return outcome.done() and outcome.exception() is None and outcome.result() is _LEAD


async def _wait_out(task: asyncio.Future[Any]) -> bool:
    """Wait for ``task`` to end even if the caller is cancelled meanwhile; whether it
    was. A batch's statement carries other requests' writes, whose outcome they must
    learn, and its connection may go back to the pool only once nothing runs on it."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            cancelled = True
    return cancelled
