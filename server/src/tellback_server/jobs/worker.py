"""The outbox worker: claims due jobs, runs their handlers, retries with backoff.

Claiming is one UPDATE ... RETURNING over a ``FOR UPDATE SKIP LOCKED`` subquery
on PostgreSQL, so any number of workers share the table without handing out
a job twice; on SQLite the claim runs under ``BEGIN IMMEDIATE``. A claimed job
carries a lease (``locked_until``) that the worker extends while the handler
runs; if the worker dies, the lease lapses and another worker retakes the job
(delivery is at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import socket
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import structlog
from sqlalchemy import and_, bindparam, delete, literal_column, null, or_, select, update
from sqlalchemy.engine import make_url

from tellback_server.db.base import table_of
from tellback_server.db.models import Job
from tellback_server.db.prepared import Prepared
from tellback_server.http.idempotency import purge_expired
from tellback_server.jobs.registry import (
    JobContext,
    JobKind,
    JobRegistry,
    PermanentFailure,
    RetryLater,
    WaitOut,
)
from tellback_server.state import AppState

log = structlog.get_logger("tellback.jobs")

DONE_RETENTION = dt.timedelta(days=7)
UNKNOWN_KIND_DELAY = dt.timedelta(seconds=60)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: about ``base`` after the first failure, doubling, capped."""
    raw = min(cap, base * float(2 ** max(0, attempt - 1)))
    jitter: float = (rng or random).uniform(0.75, 1.25)
    return raw * jitter


_JOBS = table_of(Job)
_NOW = bindparam("now", type_=_JOBS.c.updated_at.type)
_DUE = or_(
    and_(_JOBS.c.status == "queued", _JOBS.c.run_after <= _NOW),
    and_(_JOBS.c.status == "running", _JOBS.c.locked_until < _NOW),
)
# The worker's own bookkeeping runs for every job: fixed statements (db/prepared.py).
# FOR UPDATE SKIP LOCKED is PostgreSQL's; SQLite's compiler leaves it out (the claim
# runs under BEGIN IMMEDIATE there).
_CLAIM = Prepared(
    update(_JOBS)
    .where(
        _JOBS.c.id.in_(
            select(_JOBS.c.id)
            .where(_DUE)
            .order_by(_JOBS.c.run_after)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(
        status="running",
        locked_by=bindparam("worker"),
        locked_until=bindparam("until", type_=_JOBS.c.locked_until.type),
        attempts=_JOBS.c.attempts + literal_column("1"),
        updated_at=_NOW,
    )
    .returning(
        _JOBS.c.id,
        _JOBS.c.kind,
        _JOBS.c.payload,
        _JOBS.c.attempts,
        _JOBS.c.max_attempts,
        _JOBS.c.created_at,
    )
)
_FINISH = Prepared(
    update(_JOBS)
    .where(
        _JOBS.c.id == bindparam("job_id", type_=_JOBS.c.id.type),
        _JOBS.c.locked_by == bindparam("worker"),
    )
    .values(
        status=bindparam("status"),
        last_error=bindparam("error"),
        finished_at=_NOW,
        locked_by=null(),
        locked_until=null(),
        updated_at=_NOW,
    )
)


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: UUID
    kind: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    created_at: dt.datetime


class Worker:
    def __init__(
        self,
        state: AppState,
        registry: JobRegistry,
        *,
        concurrency: int | None = None,
        name: str | None = None,
        listen: bool = True,
    ) -> None:
        """``listen=False``: the process's app already listens for ``NOTIFY tellback_jobs``
        (``JobNotifier.channel`` on its one LISTEN connection), so no connection of its own."""
        self.state = state
        self.listen = listen
        self.registry = registry
        self.concurrency = concurrency or state.settings.worker_concurrency
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.lease = dt.timedelta(seconds=state.settings.job_lease_seconds)
        self._running: dict[asyncio.Task[None], ClaimedJob] = {}
        self.stop_grace_s = 10.0  # how long running jobs get to end once stopped
        self._last_maintenance = 0.0
        self._last_periodic: dict[str, float] = {}
        self._finished: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._recorder: asyncio.Task[None] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then let running jobs finish (their leases cover a kill)."""
        log.info("jobs.worker_started", worker=self.name, concurrency=self.concurrency)
        listener: asyncio.Task[None] | None = None
        if self.listen and not self.state.db.is_sqlite:
            listener = asyncio.create_task(
                self.state.notifier.listen_postgres(asyncpg_dsn(self.state.db.url))
            )
        stop_waiter = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                claimed = await self._claim_safely()
                for job in claimed:
                    task = asyncio.create_task(self._execute(job))
                    self._running[task] = job
                    task.add_done_callback(self._forget)
                await self._maintenance()
                if claimed and len(self._running) < self.concurrency:
                    continue  # there may be more due work right now
                # Sleep until a commit wakes us, a slot frees up, we are stopped, or the poll.
                poll = self.state.settings.worker_poll_seconds
                wake = asyncio.create_task(self.state.notifier.wait(poll))
                waits: set[asyncio.Future[Any]] = {wake, stop_waiter}
                if len(self._running) >= self.concurrency:
                    waits |= set(self._running)
                await asyncio.wait(waits, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
        finally:
            stop_waiter.cancel()
            if self._running:
                await asyncio.wait(set(self._running), timeout=self.stop_grace_s)
            if self._running:
                await self._abandon()
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            log.info("jobs.worker_stopped", worker=self.name)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)

    async def _abandon(self) -> None:
        """Jobs still running when the stop's grace is over: cut, and put back due now, so
        another worker takes them at once instead of when their leases lapse. (Each had
        its try: delivery is at least once, and a cut delivery may have gone out.)"""
        abandoned = dict(self._running)
        for task in abandoned:
            task.cancel()
        await asyncio.wait(abandoned)
        reason = "the worker stopped during this attempt"
        for job in abandoned.values():
            with contextlib.suppress(Exception):  # (else its lease lapses, as after a kill)
                await self._release(job, _now(), reason)
        log.warning(
            "jobs.abandoned",
            worker=self.name,
            jobs=[f"{job.kind}:{job.id}" for job in abandoned.values()],
        )

    async def run_until_idle(self, max_rounds: int = 100) -> int:
        """Run due jobs until none is left (tests and ``tellback worker --once``)."""
        total = 0
        for _ in range(max_rounds):
            claimed = await self._claim(self.concurrency)
            if not claimed:
                break
            total += len(claimed)
            await asyncio.gather(*(self._execute(job) for job in claimed))
        return total

    async def _claim_safely(self) -> list[ClaimedJob]:
        free = self.concurrency - len(self._running)
        if free <= 0:
            return []
        try:
            return await self._claim(free)
        except Exception as exc:  # noqa: BLE001 (a database outage must not kill the worker)
            log.warning("jobs.claim_failed", error_type=type(exc).__name__)
            await asyncio.sleep(1.0)
            return []

    async def _claim(self, limit: int) -> list[ClaimedJob]:
        now = _now()
        params = {"now": now, "limit": limit, "worker": self.name, "until": now + self.lease}
        db = self.state.db
        if db.is_sqlite:  # (under the writer lock: SQLite serialises claims)
            async with db.transaction(write=True) as tx:
                rows = await tx.run(_CLAIM.execute, params)
        else:  # one statement that commits by itself: no BEGIN and COMMIT round trips
            async with db.engine.connect() as connection:
                rows = await _CLAIM.fetch_alone(connection, params)
        return [
            ClaimedJob(job_id, kind, payload or {}, attempts, max_attempts, created_at)
            for job_id, kind, payload, attempts, max_attempts, created_at in rows
        ]

    async def _execute(self, job: ClaimedJob) -> None:
        structlog.contextvars.bind_contextvars(job_id=str(job.id), job_kind=job.kind)
        try:
            kind = self.registry.get(job.kind)
            if kind is None:
                log.warning("jobs.unknown_kind")
                await self._release(
                    job, _now() + UNKNOWN_KIND_DELAY, "no handler for this kind", uncount=True
                )
                return
            await self._execute_kind(job, kind)
        except Exception:
            log.exception("jobs.bookkeeping_failed")
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "job_kind")

    async def _execute_kind(self, job: ClaimedJob, kind: JobKind) -> None:
        if job.attempts > min(job.max_attempts, kind.max_attempts):
            # Retaken after a lapsed lease with no budget left: the worker died (crash,
            # OOM kill) during the last allowed attempt. Do not run it again.
            log.warning("jobs.failed", attempt=job.attempts, reason="worker lost on last attempt")
            await self._fail(job, kind, "the worker was lost during the last attempt")
            return
        heartbeat = asyncio.create_task(self._heartbeat(job.id))
        started = asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(kind.handler(self._context(job), job.payload), kind.timeout_s)
        except RetryLater as exc:
            await self._retry_or_fail(job, kind, exc.reason, exc.delay)
        except PermanentFailure as exc:
            await self._fail(job, kind, str(exc)[:2000])
        except WaitOut as exc:
            await self._wait_out(job, exc.reason[:2000], exc.delay)
        except kind.waits_out as exc:
            await self._wait_out(job, f"{type(exc).__name__}: {exc}"[:2000])
        except TimeoutError:
            await self._retry_or_fail(job, kind, f"timed out after {kind.timeout_s}s", None)
        except Exception as exc:  # noqa: BLE001 (any handler error is retried)
            log.warning("jobs.handler_error", error_type=type(exc).__name__, error=str(exc)[:500])
            await self._retry_or_fail(job, kind, f"{type(exc).__name__}: {exc}"[:2000], None)
        else:
            elapsed = asyncio.get_running_loop().time() - started
            await self._finish(job, "done", None)
            log.info("jobs.done", attempt=job.attempts, duration_ms=round(elapsed * 1000, 1))
        finally:
            heartbeat.cancel()

    def _context(self, job: ClaimedJob) -> JobContext:
        return JobContext(
            job.id, job.kind, job.attempts, job.max_attempts, job.created_at, self.state
        )

    async def _fail(self, job: ClaimedJob, kind: JobKind, reason: str) -> None:
        """The job has failed for good: what it was for gets its end first, so a crash
        between the two leaves the job to run (and fail) again, not the end unwritten."""
        if kind.on_failed is not None:
            try:
                await kind.on_failed(self._context(job), job.payload, reason)
            except Exception as exc:  # noqa: BLE001 (then the job is retaken when its lease lapses)
                log.warning("jobs.on_failed_error", error_type=type(exc).__name__)
                return
        await self._finish(job, "failed", reason)

    async def _wait_out(self, job: ClaimedJob, reason: str, delay: float | None = None) -> None:
        """A dependency is down: try again later without spending an attempt, after a
        tenth of the job's age (between 1 s and 5 minutes), so an outage of hours costs
        a few hundred cheap tries, and the job goes on within minutes of its end; no
        sooner than ``delay`` (up to a day) if the dependency said when."""
        age = (_now() - job.created_at).total_seconds()
        wait = min(300.0, max(1.0, age / 10)) * random.uniform(0.9, 1.1)  # noqa: S311
        if delay is not None:
            wait = max(wait, min(delay, 86400.0))
        log.warning("jobs.waiting", attempt=job.attempts, delay_s=round(wait, 2), reason=reason)
        self.state.metrics.jobs.labels(job.kind, "waiting").inc()
        await self._release(job, _now() + dt.timedelta(seconds=wait), reason, uncount=True)

    async def _retry_or_fail(
        self, job: ClaimedJob, kind: JobKind, reason: str, delay: float | None
    ) -> None:
        if job.attempts >= min(job.max_attempts, kind.max_attempts):
            log.warning("jobs.failed", attempt=job.attempts, reason=reason[:200])
            await self._fail(job, kind, reason)
            return
        wait = backoff_delay(job.attempts, kind.base_delay_s, kind.max_delay_s)
        if delay is not None:
            wait = max(wait, min(delay, 86400.0))
        log.info(
            "jobs.retry_scheduled",
            attempt=job.attempts,
            delay_s=round(wait, 2),
            reason=reason[:200],
        )
        self.state.metrics.jobs.labels(job.kind, "retried").inc()
        await self._release(job, _now() + dt.timedelta(seconds=wait), reason)

    async def _finish(self, job: ClaimedJob, status: str, error: str | None) -> None:
        """Record the outcome. Outcomes arriving while one is being written share the next
        transaction (a group commit): one write per batch of jobs, not one per job."""
        recorded = asyncio.get_running_loop().create_future()
        row = {"job_id": job.id, "worker": self.name, "status": status, "error": error}
        self._finished.append((row, recorded))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_finished())
        await recorded
        self.state.metrics.jobs.labels(job.kind, status).inc()

    async def _record_finished(self) -> None:
        batch: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        try:
            while self._finished:
                await asyncio.sleep(0)  # the jobs finishing alongside join this batch
                batch, self._finished = self._finished, []
                now = _now()
                rows = [{**row, "now": now} for row, _ in batch]
                try:
                    async with self.state.db.transaction(write=True) as tx:
                        await tx.run(_FINISH.execute_many, rows)
                except Exception as exc:  # noqa: BLE001 (each job of the batch raises it)
                    for _, recorded in batch:
                        if not recorded.done():
                            recorded.set_exception(exc)
                else:
                    for _, recorded in batch:
                        if not recorded.done():
                            recorded.set_result(None)
        finally:  # cancelled: nobody may wait for an outcome that will not be written
            for _, recorded in batch + self._finished:
                if not recorded.done():
                    recorded.cancel()

    async def _release(
        self, job: ClaimedJob, run_after: dt.datetime, reason: str, *, uncount: bool = False
    ) -> None:
        values: dict[str, Any] = {
            "status": "queued",
            "run_after": run_after,
            "last_error": reason,
            "locked_by": None,
            "locked_until": None,
            "updated_at": _now(),
        }
        if uncount:
            values["attempts"] = Job.attempts - 1
        async with self.state.db.session(write=True) as db:
            await db.execute(
                update(Job).where(Job.id == job.id, Job.locked_by == self.name).values(**values)
            )

    async def _heartbeat(self, job_id: UUID) -> None:
        interval = max(1.0, self.lease.total_seconds() / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                async with self.state.db.session(write=True) as db:
                    await db.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.locked_by == self.name)
                        .values(locked_until=_now() + self.lease)
                    )

    async def _maintenance(self) -> None:
        loop_now = asyncio.get_running_loop().time()
        for name, (interval, fn) in self.registry.periodic_tasks().items():
            last = self._last_periodic.get(name)
            if last is not None and loop_now - last < interval:
                continue
            self._last_periodic[name] = loop_now
            try:
                await fn(self.state)
            except Exception as exc:  # noqa: BLE001 (a periodic task must not stop the worker)
                log.warning("jobs.periodic_failed", task=name, error_type=type(exc).__name__)
        if loop_now - self._last_maintenance < 600:
            return
        self._last_maintenance = loop_now
        try:
            async with self.state.db.session(write=True) as db:
                await db.execute(
                    delete(Job).where(
                        Job.status == "done", Job.finished_at < _now() - DONE_RETENTION
                    )
                )
                await purge_expired(db)
        except Exception as exc:  # noqa: BLE001
            log.warning("jobs.maintenance_failed", error_type=type(exc).__name__)


def asyncpg_dsn(url: str) -> str:
    """``TELLBACK_DATABASE_URL`` as a DSN for ``asyncpg.connect`` (the LISTEN connection).
    The URL's query holds ``asyncpg.connect``'s keywords (SQLAlchemy passes them so);
    a DSN names them libpq's way, and sends what it does not know to PostgreSQL as
    settings, which refuses them: ``ssl`` becomes ``sslmode``, and keywords a DSN has
    no name for (timeouts, statement caches) are left out."""
    parsed = make_url(url)
    query: dict[str, str | tuple[str, ...]] = {}
    for key, value in parsed.query.items():
        if key == "ssl":
            text = str(value).lower()
            query["sslmode"] = {"true": "require", "false": "disable"}.get(text, text)
        elif key in _DSN_KEYS:
            query[key] = value
    dsn = parsed.set(drivername="postgresql", query=query)
    return dsn.render_as_string(hide_password=False)


# What asyncpg reads from a DSN's query by name (the rest would become server settings).
_DSN_KEYS = frozenset(
    {"host", "port", "user", "password", "passfile", "service", "database"}
    | {"target_session_attrs", "krbsrvname", "gsslib"}
)
