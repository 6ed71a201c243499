"""The jobs outbox on SQLite and PostgreSQL: enqueue, claim, retry, wake-up, leases.

In-process tests drive :class:`Worker` directly (``run_until_idle`` for one pass,
``run`` for the real loop). Process tests start ``tellback worker`` with the
handlers of ``tests.server.job_plugins`` and kill it with SIGKILL where a crash
is the point. Waits that the code under test would make (backoff, Retry-After)
are skipped by moving ``run_after`` back, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import IO, Any
from uuid import UUID

import asyncpg
import pytest
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from structlog.testing import capture_logs

from tellback_server.asgi import build_state, create_app
from tellback_server.db.models import AdminToken, Job
from tellback_server.jobs import enqueue
from tellback_server.jobs.notify import NOTIFY_CHANNEL
from tellback_server.jobs.registry import JobContext, JobRegistry
from tellback_server.jobs.worker import Worker, asyncpg_dsn, backoff_delay
from tellback_server.security import hash_token
from tellback_server.settings import Settings
from tellback_server.state import AppState
from tests.server import job_plugins
from tests.server.conftest import SECRET, lifespan, listening_backends, make_settings
from tests.server.job_plugins import read_lines

REPO = Path(__file__).resolve().parents[2]
TELLBACK = Path(sys.executable).parent / "tellback"
PLUGIN = "tests.server.job_plugins:register"
LEASE_S = 5
IDLE_POLL_S = 30.0  # long enough that only a wake-up can explain a prompt pick-up
TOLERANCE = dt.timedelta(milliseconds=50)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def job_settings(database_url: str, data_dir: Path) -> Settings:
    return replace(
        make_settings(database_url, data_dir),
        worker_poll_seconds=IDLE_POLL_S,
        job_lease_seconds=LEASE_S,
    )


def plugin_registry() -> JobRegistry:
    registry = JobRegistry()
    job_plugins.register(registry)
    return registry


@pytest.fixture
async def state(database_url: str, tmp_path: Path) -> AsyncIterator[AppState]:
    app_state = build_state(job_settings(database_url, tmp_path / "data"))
    try:
        yield app_state
    finally:
        await app_state.db.dispose()


# --- database helpers -------------------------------------------------------------------


async def enqueue_one(db: AsyncSession, kind: str, payload: dict[str, Any], **kwargs: Any) -> UUID:
    """``enqueue`` without a dedupe key: always queues, so always returns the job's id."""
    job_id = await enqueue(db, kind, payload, **kwargs)
    assert job_id is not None
    return job_id


async def add_job(state: AppState, kind: str, payload: dict[str, Any], **kwargs: Any) -> UUID:
    """Enqueue one job in a transaction of its own and commit it."""
    async with state.db.session(write=True) as db:
        return await enqueue_one(db, kind, payload, **kwargs)


async def add_job_silently(state: AppState, kind: str, payload: dict[str, Any]) -> UUID:
    """Insert a due job row *without* ``enqueue``: no NOTIFY, no commit hook, no wake-up."""
    job_id = uuid.uuid4()
    now = _now()
    async with state.db.session(write=True) as db:
        await db.execute(
            insert(Job).values(
                id=job_id,
                kind=kind,
                payload=payload,
                status="queued",
                attempts=0,
                max_attempts=10,
                run_after=now,
                created_at=now,
                updated_at=now,
            )
        )
    return job_id


async def load_job(state: AppState, job_id: UUID) -> Job:
    async with state.db.session(write=False) as db:
        job = await db.get(Job, job_id)
    assert job is not None, f"job {job_id} is gone"
    return job


async def count_jobs(state: AppState, status: str | None = None) -> int:
    stmt = select(func.count()).select_from(Job)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    async with state.db.session(write=False) as db:
        return int(await db.scalar(stmt) or 0)


async def make_due(state: AppState, job_id: UUID) -> None:
    """Play the clock forward: make a job that waits for its ``run_after`` due now."""
    async with state.db.session(write=True) as db:
        await db.execute(
            update(Job).where(Job.id == job_id).values(run_after=_now() - dt.timedelta(seconds=1))
        )


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    *,
    within: float,
    what: str,
    interval: float = 0.02,
    proc: asyncio.subprocess.Process | None = None,
    log: Path | None = None,
) -> float:
    """Poll ``check`` until it holds; return the seconds it took."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if proc is not None and proc.returncode is not None:
            raise AssertionError(
                f"worker exited ({proc.returncode}) while waiting for {what}:\n{log_tail(log)}"
            )
        if time.monotonic() - start > within:
            raise AssertionError(f"gave up after {within}s waiting for {what}\n{log_tail(log)}")
        await asyncio.sleep(interval)


def log_tail(log: Path | None) -> str:
    if log is None:
        return ""
    return "\n".join(read_lines(log)[-40:])


# --- worker helpers ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``worker.run`` in the background; stop it (and surface its errors) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


def _open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


def worker_env(database_url: str, data_dir: Path, *, poll: float, lease: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELLBACK_")}
    # The console script puts its own bin/ first on sys.path, not the cwd: `tests` (the
    # plugin's package) is importable only with the repository root on PYTHONPATH.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(
        TELLBACK_DATABASE_URL=database_url,
        TELLBACK_SECRET_KEY=SECRET,
        TELLBACK_DATA_DIR=str(data_dir),
        TELLBACK_JOB_LEASE_SECONDS=str(lease),
        TELLBACK_WORKER_POLL_SECONDS=str(poll),
        TELLBACK_LOG_FORMAT="json",
    )
    return env


@contextlib.asynccontextmanager
async def worker_process(
    database_url: str,
    tmp_path: Path,
    name: str,
    *args: str,
    poll: float = 60.0,
    lease: int = LEASE_S,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """``tellback worker --plugin tests.server.job_plugins:register`` as a child process.

    It opens no port. It is SIGKILLed (if still alive) and reaped on exit, whatever happens.
    """
    log = tmp_path / f"{name}.log"
    with _open_log(log) as out:
        proc = await asyncio.create_subprocess_exec(
            str(TELLBACK),
            "worker",
            "--plugin",
            PLUGIN,
            *args,
            cwd=REPO,
            env=worker_env(database_url, tmp_path / name, poll=poll, lease=lease),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield proc, log
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# --- enqueue: the transactional outbox ---------------------------------------------------


async def enqueue_then_fail(state: AppState, **kwargs: Any) -> None:
    """A request that writes data and a job, then fails before its transaction commits."""
    async with state.db.session(write=True) as db:
        db.add(AdminToken(name="doomed", token_hash=hash_token("tbadm_doomed")))
        await enqueue(db, "test.append", {"path": "/nonexistent", "line": "x"}, **kwargs)
        raise RuntimeError("the request failed")


async def test_the_listen_connection_takes_the_urls_asyncpg_keywords(database_url: str) -> None:
    """TELLBACK_DATABASE_URL's query holds asyncpg.connect's keywords (``ssl=require``
    for TLS, ``command_timeout``): the LISTEN connection's DSN sent them to PostgreSQL
    as settings, which refused the connection, so workers never heard a NOTIFY."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite has no LISTEN")
    keywords = {"ssl": "disable", "command_timeout": "30"}  # (the test server has no TLS)
    url = make_url(database_url).update_query_dict(keywords).render_as_string(False)
    assert "sslmode=disable" in asyncpg_dsn(url)
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        assert await connection.fetchval("select 1") == 1
    finally:
        await connection.close()


async def test_enqueue_commits_and_rolls_back_with_the_callers_data(state: AppState) -> None:
    notified: asyncio.Queue[str] = asyncio.Queue()
    listener: Any = None
    if not state.db.is_sqlite:
        # A bare LISTEN connection: NOTIFY must also be transactional.
        listener = await asyncpg.connect(asyncpg_dsn(state.db.url))
        await listener.add_listener(NOTIFY_CHANNEL, lambda *a: notified.put_nowait(a[2]))
    try:
        with pytest.raises(RuntimeError, match="the request failed"):
            await enqueue_then_fail(state)
        assert await count_jobs(state) == 0
        async with state.db.session(write=False) as db:
            assert await db.scalar(select(func.count()).select_from(AdminToken)) == 0
        # No wake-up for a job that never committed.
        started = time.monotonic()
        await state.notifier.wait(0.3)
        assert time.monotonic() - started >= 0.25, "a rolled-back enqueue woke the workers"
        if listener is not None:
            await asyncio.sleep(0.2)
            assert notified.empty(), "a rolled-back enqueue sent NOTIFY"

        async with state.db.session(write=True) as db:
            db.add(AdminToken(name="kept", token_hash=hash_token("tbadm_kept")))
            job_id = await enqueue_one(db, "test.append", {"path": "/nonexistent", "line": "x"})
        job = await load_job(state, job_id)
        assert (job.kind, job.status, job.attempts, job.max_attempts) == (
            "test.append",
            "queued",
            0,
            10,
        )
        assert job.payload == {"path": "/nonexistent", "line": "x"}
        assert job.locked_by is None
        async with state.db.session(write=False) as db:
            assert await db.scalar(select(func.count()).select_from(AdminToken)) == 1
        started = time.monotonic()
        await state.notifier.wait(5.0)
        assert time.monotonic() - started < 0.5, "a committed enqueue did not wake the workers"
        if listener is not None:
            assert await asyncio.wait_for(notified.get(), 2.0) == NOTIFY_CHANNEL
    finally:
        if listener is not None:
            await listener.close()


async def test_committed_job_runs_once_and_is_done(state: AppState, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job_id = await add_job(state, "test.append", {"path": str(out), "line": "hello"})
    worker = Worker(state, plugin_registry())
    assert await worker.run_until_idle() == 1
    assert read_lines(out) == ["hello"]
    job = await load_job(state, job_id)
    assert job.status == "done"
    assert job.attempts == 1
    assert job.last_error is None
    assert job.locked_by is None
    assert job.locked_until is None
    assert job.finished_at is not None
    # Done is final: nothing runs it again.
    assert await worker.run_until_idle() == 0
    assert await Worker(state, plugin_registry()).run_until_idle() == 0
    assert read_lines(out) == ["hello"]


async def test_jobs_that_finish_together_share_one_write(state: AppState) -> None:
    """Outcomes are group-committed: claiming eight jobs and recording their eight outcomes
    is a few transactions, not one per job."""

    async def quick(_ctx: JobContext, _payload: dict[str, Any]) -> None:
        return None

    registry = JobRegistry()
    registry.register("test.quick", quick)
    ids = [await add_job(state, "test.quick", {}) for _ in range(8)]
    engine = state.db.sync_engine or state.db.engine.sync_engine
    commits = 0

    def count(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(engine, "commit", count)
    try:
        assert await Worker(state, registry, concurrency=8).run_until_idle() == 8
    finally:
        event.remove(engine, "commit", count)
    # The claim, the outcomes, the claim that finds nothing (one per job would be ten).
    assert commits <= 3
    for job_id in ids:
        job = await load_job(state, job_id)
        assert (job.status, job.attempts, job.locked_by) == ("done", 1, None)
        assert job.finished_at is not None


async def test_job_is_not_run_before_its_run_after(state: AppState, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job_id = await add_job(
        state,
        "test.append",
        {"path": str(out), "line": "later"},
        run_after=_now() + dt.timedelta(hours=1),
    )
    worker = Worker(state, plugin_registry())
    assert await worker.run_until_idle() == 0
    assert (await load_job(state, job_id)).status == "queued"
    await make_due(state, job_id)
    assert await worker.run_until_idle() == 1
    assert read_lines(out) == ["later"]


async def test_dedupe_key_queues_a_job_once(state: AppState, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    async with state.db.session(write=True) as db:
        first = await enqueue(db, "test.append", {"path": str(out), "line": "one"}, dedupe_key="k1")
        same_tx = await enqueue(
            db, "test.append", {"path": str(out), "line": "dup"}, dedupe_key="k1"
        )
    assert first is not None
    assert same_tx is None
    async with state.db.session(write=True) as db:
        assert await enqueue(db, "test.append", {"path": str(out)}, dedupe_key="k1") is None
    # A rolled-back enqueue does not hold on to its key.
    with pytest.raises(RuntimeError, match="the request failed"):
        await enqueue_then_fail(state, dedupe_key="k2")
    async with state.db.session(write=True) as db:
        second = await enqueue(
            db, "test.append", {"path": str(out), "line": "two"}, dedupe_key="k2"
        )
    assert second is not None
    assert await count_jobs(state) == 2
    assert await Worker(state, plugin_registry()).run_until_idle() == 2
    assert sorted(read_lines(out)) == ["one", "two"]


# --- retries, budget, failure ------------------------------------------------------------


async def test_failing_handler_backs_off_exponentially_then_fails(state: AppState) -> None:
    calls: list[int] = []

    async def boom(ctx: JobContext, _payload: dict[str, Any]) -> None:
        calls.append(ctx.attempt)
        raise ValueError(f"boom #{ctx.attempt}")

    registry = JobRegistry()
    registry.register("test.boom", boom, max_attempts=4, base_delay_s=10.0, max_delay_s=1000.0)
    job_id = await add_job(state, "test.boom", {})
    worker = Worker(state, registry)

    delays: list[float] = []
    previous = (await load_job(state, job_id)).run_after
    for attempt in (1, 2, 3):
        before = _now()
        assert await worker.run_until_idle() == 1
        after = _now()
        job = await load_job(state, job_id)
        assert job.status == "queued", f"attempt {attempt}"
        assert job.attempts == attempt
        assert job.last_error == f"ValueError: boom #{attempt}"
        assert job.locked_by is None
        assert job.locked_until is None
        assert job.run_after > previous, "run_after did not move forward"
        # About base * 2^(attempt-1), with +-25% jitter.
        nominal = dt.timedelta(seconds=10.0 * 2 ** (attempt - 1))
        assert before + nominal * 0.75 - TOLERANCE <= job.run_after, f"attempt {attempt}"
        assert job.run_after <= after + nominal * 1.25 + TOLERANCE, f"attempt {attempt}"
        delays.append((job.run_after - after).total_seconds())
        # Not due yet: a second pass leaves it alone.
        assert await worker.run_until_idle() == 0
        previous = job.run_after
        await make_due(state, job_id)

    assert delays == sorted(delays), f"delays did not grow: {delays}"
    assert delays[0] < delays[1] < delays[2]

    assert await worker.run_until_idle() == 1
    job = await load_job(state, job_id)
    assert job.status == "failed"
    assert job.attempts == 4
    assert job.last_error == "ValueError: boom #4"
    assert job.finished_at is not None
    assert job.locked_by is None
    assert calls == [1, 2, 3, 4]
    # Failed is final.
    await make_due(state, job_id)
    assert await worker.run_until_idle() == 0
    assert calls == [1, 2, 3, 4]


async def test_job_max_attempts_bounds_the_budget(state: AppState) -> None:
    calls: list[int] = []

    async def boom(ctx: JobContext, _payload: dict[str, Any]) -> None:
        calls.append(ctx.attempt)
        raise RuntimeError("still broken")

    registry = JobRegistry()
    registry.register("test.boom", boom, max_attempts=10, base_delay_s=1.0)
    job_id = await add_job(state, "test.boom", {}, max_attempts=2)
    worker = Worker(state, registry)
    assert await worker.run_until_idle() == 1
    assert (await load_job(state, job_id)).status == "queued"
    await make_due(state, job_id)
    assert await worker.run_until_idle() == 1
    job = await load_job(state, job_id)
    assert (job.status, job.attempts, job.last_error) == ("failed", 2, "RuntimeError: still broken")
    assert calls == [1, 2]


async def test_retry_delays_carry_jitter(state: AppState) -> None:
    async def boom(_ctx: JobContext, _payload: dict[str, Any]) -> None:
        raise ValueError("boom")

    registry = JobRegistry()
    registry.register("test.boom", boom, base_delay_s=100.0)
    async with state.db.session(write=True) as db:
        ids = [await enqueue_one(db, "test.boom", {"n": n}) for n in range(8)]
    before = _now()
    worker = Worker(state, registry, concurrency=8)
    assert await worker.run_until_idle() == 8
    delays = [((await load_job(state, i)).run_after - before).total_seconds() for i in ids]
    assert all(75.0 - 0.05 <= d <= 125.0 + 1.0 for d in delays), delays
    # Released within milliseconds of each other: only jitter spreads them by seconds.
    assert max(delays) - min(delays) > 1.0, f"no jitter: {delays}"


def test_backoff_delay_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    for attempt, nominal in ((1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0)):
        for _ in range(50):
            assert nominal * 0.75 <= backoff_delay(attempt, 2.0, 1000.0, rng) <= nominal * 1.25
    samples = [backoff_delay(30, 2.0, 60.0, rng) for _ in range(200)]
    assert all(45.0 <= s <= 75.0 for s in samples)
    assert max(samples) - min(samples) > 10.0  # jitter spreads a thundering herd


async def test_retry_later_honours_the_requested_delay(state: AppState) -> None:
    job_id = await add_job(state, "test.retry_later", {"delay": 30})
    worker = Worker(state, plugin_registry())
    before = _now()
    assert await worker.run_until_idle() == 1
    after = _now()
    job = await load_job(state, job_id)
    assert job.status == "queued"
    assert job.attempts == 1
    assert job.last_error == "rate limited by the provider"
    assert job.run_after >= before + dt.timedelta(seconds=30) - TOLERANCE
    # The requested delay, not the (1 s) backoff, and not much more than it either.
    assert job.run_after <= after + dt.timedelta(seconds=31.25) + TOLERANCE
    assert await worker.run_until_idle() == 0

    # On the last attempt, RetryLater fails the job instead.
    last = await add_job(state, "test.retry_later", {"delay": 30}, max_attempts=1)
    assert await worker.run_until_idle() == 1
    job = await load_job(state, last)
    assert (job.status, job.attempts) == ("failed", 1)
    assert job.last_error == "rate limited by the provider"


async def test_permanent_failure_fails_at_once(state: AppState) -> None:
    job_id = await add_job(state, "test.permanent", {"reason": "unknown recipient"})
    worker = Worker(state, plugin_registry())
    assert await worker.run_until_idle() == 1
    job = await load_job(state, job_id)
    assert job.status == "failed"
    assert job.attempts == 1
    assert job.max_attempts == 10
    assert job.last_error == "unknown recipient"
    assert job.finished_at is not None
    assert job.locked_by is None
    await make_due(state, job_id)
    assert await worker.run_until_idle() == 0


async def test_handler_timeout_is_retried(state: AppState) -> None:
    async def hang(_ctx: JobContext, _payload: dict[str, Any]) -> None:
        await asyncio.sleep(30)

    registry = JobRegistry()
    registry.register("test.hang", hang, timeout_s=0.2)
    job_id = await add_job(state, "test.hang", {})
    started = time.monotonic()
    assert await Worker(state, registry).run_until_idle() == 1
    assert time.monotonic() - started < 5
    job = await load_job(state, job_id)
    assert (job.status, job.attempts) == ("queued", 1)
    assert job.last_error == "timed out after 0.2s"
    assert job.run_after > _now()


async def test_unknown_kind_stays_queued_without_using_attempts(
    state: AppState, tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    job_id = await add_job(state, "test.nobody_handles_this", {"path": str(out), "line": "late"})
    worker = Worker(state, plugin_registry())
    for _ in range(3):
        before = _now()
        assert await worker.run_until_idle() == 1
        job = await load_job(state, job_id)
        assert job.status == "queued"
        assert job.attempts == 0
        assert job.last_error == "no handler for this kind"
        assert job.locked_by is None
        assert job.run_after > before + dt.timedelta(seconds=30), "unknown kind spun hot"
        assert await worker.run_until_idle() == 0
        await make_due(state, job_id)

    # A worker that knows the kind (say, after a deploy) runs it with its full budget.
    registry = JobRegistry()
    registry.register("test.nobody_handles_this", job_plugins.append)
    assert await Worker(state, registry).run_until_idle() == 1
    job = await load_job(state, job_id)
    assert (job.status, job.attempts, job.last_error) == ("done", 1, None)
    assert read_lines(out) == ["late"]


# --- wake-up -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_commit_wakes_an_idle_worker_at_once(state: AppState, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    assert state.settings.worker_poll_seconds == IDLE_POLL_S
    async with running(Worker(state, plugin_registry(), name="idle")):
        if not state.db.is_sqlite:
            # Its LISTEN connection wakes it once on connecting: let that happen first.

            async def listening() -> bool:
                return await listening_backends(state) >= 1

            await wait_until(listening, within=20, what="LISTEN")
        await asyncio.sleep(0.5)  # past its first claim: it now sleeps for the 30 s poll
        # Control: a row that arrives without enqueue's wake-up waits for the (30 s) poll.
        silent = await add_job_silently(state, "test.append", {"path": str(out), "line": "silent"})
        await asyncio.sleep(0.7)
        assert (await load_job(state, silent)).status == "queued"

        job_id = await add_job(state, "test.append", {"path": str(out), "line": "woken"})

        async def done() -> bool:
            return (await load_job(state, job_id)).status == "done"

        latency = await wait_until(done, within=10, what="the woken job")
        assert latency < 1.0, f"picked up after {latency:.2f}s"
        assert (await load_job(state, silent)).status == "done"  # a wake-up claims all due work
    assert sorted(read_lines(out)) == ["silent", "woken"]


@pytest.mark.timeout(30)
async def test_app_runs_the_worker_unless_disabled(state: AppState, tmp_path: Path) -> None:
    """``tellback serve`` runs the worker in-process; ``--no-worker`` (run_worker=False) not."""
    out = tmp_path / "out.txt"
    no_worker = create_app(state.settings, registry=plugin_registry(), state=state)
    async with lifespan(no_worker):
        first = await add_job(state, "test.append", {"path": str(out), "line": "one"})
        await asyncio.sleep(0.5)
        assert (await load_job(state, first)).status == "queued"

    with_worker = create_app(
        state.settings, registry=plugin_registry(), state=state, run_worker=True
    )
    async with lifespan(with_worker):
        await asyncio.sleep(0.5)
        second = await add_job(state, "test.append", {"path": str(out), "line": "two"})

        async def done() -> bool:
            return (await load_job(state, second)).status == "done"

        latency = await wait_until(done, within=10, what="the app's worker")
        assert latency < 1.0
        assert (await load_job(state, first)).status == "done"
    assert sorted(read_lines(out)) == ["one", "two"]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.timeout(60)
async def test_the_apps_worker_is_woken_through_the_apps_one_listen_connection(
    database_url: str, state: AppState, tmp_path: Path
) -> None:
    """``tellback serve`` on PostgreSQL holds one LISTEN connection for all it hears:
    events, access changes, and ``tellback_jobs`` for its in-process worker. A job
    committed by another process wakes that worker at once (the poll is 30 s)."""
    out = tmp_path / "out.txt"
    other = build_state(job_settings(database_url, tmp_path / "other"))  # another process
    app = create_app(state.settings, registry=plugin_registry(), state=state, run_worker=True)
    try:
        async with lifespan(app):

            async def listening() -> bool:
                return await listening_backends(other) >= 1

            await wait_until(listening, within=20, what="LISTEN")
            await asyncio.sleep(0.5)  # past the worker's first claim: it sleeps for the poll
            assert await listening_backends(other) == 1
            job_id = await add_job(other, "test.append", {"path": str(out), "line": "woken"})

            async def done() -> bool:
                return (await load_job(other, job_id)).status == "done"

            latency = await wait_until(done, within=10, what="the notified job")
            assert latency < 1.0, f"picked up after {latency:.2f}s"
    finally:
        await other.db.dispose()
    assert read_lines(out) == ["woken"]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.timeout(60)
async def test_notify_wakes_a_worker_in_another_process(
    database_url: str, state: AppState, tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    async with worker_process(database_url, tmp_path, "w1", poll=60.0) as (proc, log):

        async def listening() -> bool:
            return await listening_backends(state) >= 1

        await wait_until(listening, within=30, what="LISTEN", proc=proc, log=log)
        await asyncio.sleep(0.5)  # let the catch-up claim after LISTEN finish

        # Control: without NOTIFY the other process sleeps through its 60 s poll.
        silent = await add_job_silently(state, "test.append", {"path": str(out), "line": "silent"})
        await asyncio.sleep(1.5)
        assert (await load_job(state, silent)).status == "queued"

        job_id = await add_job(state, "test.append", {"path": str(out), "line": "notified"})

        async def done() -> bool:
            return (await load_job(state, job_id)).status == "done"

        latency = await wait_until(done, within=15, what="the notified job", proc=proc, log=log)
        assert latency < 2.0, f"picked up after {latency:.2f}s"
        assert (await load_job(state, silent)).status == "done"
        assert proc.returncode is None
    assert sorted(read_lines(out)) == ["notified", "silent"]


# --- concurrency ---------------------------------------------------------------------------


def tagging_registry(label: str) -> JobRegistry:
    async def tagged(ctx: JobContext, payload: dict[str, Any]) -> None:
        await asyncio.sleep(0.02)
        line = f"{ctx.job_id} {label} {ctx.attempt}"
        await asyncio.to_thread(job_plugins.append_line, payload["path"], line)

    registry = JobRegistry()
    registry.register("test.tagged", tagged)
    return registry


@pytest.mark.timeout(60)
async def test_two_workers_run_each_job_exactly_once(
    database_url: str, state: AppState, tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    async with state.db.session(write=True) as db:
        ids = {str(await enqueue_one(db, "test.tagged", {"path": str(out)})) for _ in range(50)}
    # Two workers with engines (and, on SQLite, writer locks) of their own, as two processes.
    other = build_state(job_settings(database_url, tmp_path / "data2"))
    try:
        worker_a = Worker(state, tagging_registry("a"), concurrency=4, name="a")
        worker_b = Worker(other, tagging_registry("b"), concurrency=4, name="b")
        async with running(worker_a), running(worker_b):

            async def all_done() -> bool:
                return await count_jobs(state, "done") == 50

            await wait_until(all_done, within=40, what="50 jobs done", interval=0.05)
    finally:
        await other.db.dispose()
    lines = [line.split() for line in read_lines(out)]
    recorded = [job_id for job_id, _, _ in lines]
    assert len(recorded) == 50, "a job ran more than once" if len(recorded) > 50 else ""
    assert set(recorded) == ids
    assert {attempt for _, _, attempt in lines} == {"1"}
    assert {label for _, label, _ in lines} == {"a", "b"}, "one worker did all the work"
    async with state.db.session(write=False) as db:
        attempts = set((await db.scalars(select(Job.attempts))).all())
    assert attempts == {1}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.timeout(60)
async def test_two_worker_processes_run_each_job_exactly_once(
    database_url: str, state: AppState, tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    async with (
        worker_process(database_url, tmp_path, "w1", "--concurrency", "4") as (p1, log1),
        worker_process(database_url, tmp_path, "w2", "--concurrency", "4") as (p2, log2),
    ):

        async def both_listening() -> bool:
            return await listening_backends(state) >= 2

        await wait_until(both_listening, within=30, what="two LISTENs", proc=p1, log=log1)
        await asyncio.sleep(0.5)
        assert p2.returncode is None, log_tail(log2)
        async with state.db.session(write=True) as db:
            ids = {
                str(await enqueue_one(db, "test.record", {"path": str(out), "sleep": 0.05}))
                for _ in range(50)
            }

        async def all_done() -> bool:
            return await count_jobs(state, "done") == 50

        await wait_until(all_done, within=30, what="50 jobs done", interval=0.05, proc=p2)
        assert p1.returncode is None, log_tail(log1)
    lines = [line.split() for line in read_lines(out)]
    recorded = [job_id for job_id, _, _ in lines]
    assert len(recorded) == 50
    assert set(recorded) == ids
    assert {attempt for _, _, attempt in lines} == {"1"}
    assert {pid for _, pid, _ in lines} == {str(p1.pid), str(p2.pid)}, "one process did it all"


# --- leases: a worker killed mid-job ---------------------------------------------------------


@pytest.mark.timeout(60)
async def test_killed_workers_job_is_retaken_after_its_lease(
    database_url: str, state: AppState, tmp_path: Path
) -> None:
    out = tmp_path / "slow.txt"
    job_id = await add_job(state, "test.slow_first", {"path": str(out), "seconds": 120})
    async with worker_process(database_url, tmp_path, "doomed", poll=60.0) as (proc, log):

        async def claimed_and_started() -> bool:
            job = await load_job(state, job_id)
            return job.status == "running" and len(read_lines(out)) == 1

        await wait_until(claimed_and_started, within=30, what="the claim", proc=proc, log=log)
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL

    job = await load_job(state, job_id)
    assert job.status == "running"
    assert job.attempts == 1
    assert job.locked_by is not None
    assert str(proc.pid) in job.locked_by
    assert job.locked_until is not None
    remaining = (job.locked_until - _now()).total_seconds()
    assert 1.0 < remaining <= LEASE_S + 0.5, f"lease has {remaining:.2f}s left"
    assert read_lines(out) == [f"start {job_id} {proc.pid} 1"]

    rescuer = Worker(state, plugin_registry(), name="rescuer")
    # While the lease holds, nobody else may take the job (the holder might be alive).
    assert await rescuer.run_until_idle() == 0
    assert (await load_job(state, job_id)).locked_by == job.locked_by

    await asyncio.sleep(max(0.0, (job.locked_until - _now()).total_seconds()) + 0.2)
    assert await rescuer.run_until_idle() == 1
    job = await load_job(state, job_id)
    assert job.status == "done"
    assert job.attempts == 2
    assert job.locked_by is None
    assert job.last_error is None
    me = os.getpid()
    assert read_lines(out) == [
        f"start {job_id} {proc.pid} 1",
        f"start {job_id} {me} 2",
        f"done {job_id} {me} 2",
    ]


@pytest.mark.timeout(30)
async def test_a_live_workers_lease_is_extended_while_its_job_runs(
    state: AppState, tmp_path: Path
) -> None:
    """A job running longer than the lease is not retaken while its worker is alive."""
    short = build_state(replace(state.settings, job_lease_seconds=2))
    try:
        started = asyncio.Event()

        async def long_job(_ctx: JobContext, _payload: dict[str, Any]) -> None:
            started.set()
            await asyncio.sleep(2 * 2 + 0.5)  # more than two leases

        registry = JobRegistry()
        registry.register("test.long", long_job)
        job_id = await add_job(short, "test.long", {})
        holder = asyncio.create_task(Worker(short, registry, name="holder").run_until_idle())
        try:
            await asyncio.wait_for(started.wait(), 10)
            thief = Worker(state, plugin_registry(), name="thief")
            while not holder.done():
                assert await thief.run_until_idle() == 0, "a live worker's job was retaken"
                job = await load_job(state, job_id)
                if job.status == "running":
                    assert job.locked_by == "holder"
                await asyncio.sleep(0.25)
            assert await holder == 1
        finally:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
    finally:
        await short.db.dispose()
    job = await load_job(state, job_id)
    assert (job.status, job.attempts) == ("done", 1)


async def test_lapsed_lease_on_the_last_attempt_does_not_exceed_the_budget(
    state: AppState, tmp_path: Path
) -> None:
    """A job whose worker died on its last allowed attempt must fail, not run again.

    Otherwise a job that kills its worker (a crash, the OOM killer) is retaken forever.
    The row is put in the state a SIGKILLed worker leaves behind.
    """
    out = tmp_path / "out.txt"
    job_id = await add_job(state, "test.append", {"path": str(out), "line": "x"}, max_attempts=2)
    async with state.db.session(write=True) as db:
        await db.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status="running",
                attempts=2,
                locked_by="dead-host:1:dead",
                locked_until=_now() - dt.timedelta(seconds=1),
            )
        )
    await Worker(state, plugin_registry()).run_until_idle()
    job = await load_job(state, job_id)
    assert read_lines(out) == [], "the job ran beyond its max_attempts"
    assert job.status == "failed"
    assert job.last_error


async def test_a_job_still_running_when_the_worker_stops_is_put_back_at_once(
    state: AppState, tmp_path: Path
) -> None:
    """Stopped (a deploy, a scale-down), the worker gives running jobs their grace, then
    puts back those still running, due now, and says which: another worker takes them at
    once, where before it waited for their leases to lapse (up to a minute), and the log
    said only `jobs.worker_stopped`."""
    out = tmp_path / "slow.txt"
    job_id = await add_job(state, "test.slow_first", {"path": str(out), "seconds": 120})
    worker = Worker(state, plugin_registry())
    worker.stop_grace_s = 0.5
    with capture_logs() as logs:
        async with running(worker):

            async def started() -> bool:
                return len(read_lines(out)) == 1

            await wait_until(started, within=10, what="the job's start")
    job = await load_job(state, job_id)
    assert (job.status, job.locked_by, job.locked_until) == ("queued", None, None)
    assert job.run_after <= _now()
    assert job.last_error == "the worker stopped during this attempt"
    (abandoned,) = [e for e in logs if e["event"] == "jobs.abandoned"]
    assert abandoned["jobs"] == [f"test.slow_first:{job_id}"]
    assert await Worker(state, plugin_registry(), name="next").run_until_idle() == 1
    assert (await load_job(state, job_id)).status == "done"
