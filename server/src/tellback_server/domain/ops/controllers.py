"""Operations endpoints: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import msgspec
from litestar import Request, Response, get
from sqlalchemy import func, select, text

from tellback_server.db.models import Job
from tellback_server.http.deps import app_state
from tellback_server.http.errors import problem_response
from tellback_server.state import AppState
from tellback_server.storage.base import StorageError

BACKLOG_TIMEOUT_S = 2.0  # Prometheus's default scrape timeout is 10 s


class Health(msgspec.Struct):
    status: str


@get("/healthz", tags=["ops"], summary="Process is up")
async def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", tags=["ops"], summary="Database (and storage) reachable")
async def readyz(request: Request[Any, Any, Any]) -> Response[Any]:
    state = app_state(request)
    try:
        async with state.db.session(write=False) as db:
            await db.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001 (any failure means not ready)
        return problem_response(
            request,
            503,
            "service_unavailable",
            "database unreachable",
            headers={"Retry-After": "5"},
        )
    try:
        await state.store.ping()
    except StorageError as exc:
        # Its reason (unreachable, or an S3 error code such as SignatureDoesNotMatch for
        # wrong credentials), never a key: what an operator needs to tell the two apart.
        return problem_response(
            request,
            503,
            "storage_unavailable",
            str(exc),
            headers={"Retry-After": "5"},
        )
    return Response(content=Health(status="ready"))


@get("/metrics", tags=["ops"], summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    state = app_state(request)
    await _job_backlog(state)
    return state.metrics.render()


async def _job_backlog(state: AppState) -> None:
    """The queue as the database holds it, so any API process reports the whole
    backlog (workers are often separate processes with no port of their own). A
    database that cannot answer within ``BACKLOG_TIMEOUT_S`` (PostgreSQL down, or the
    table locked) leaves the last figures, with the time they were read, so the scrape
    still answers and holds no connection while it waits; readiness reports the
    database. (SQLite runs on the event loop and never makes a reader wait.)"""
    now = dt.datetime.now(dt.UTC)
    try:
        async with asyncio.timeout(BACKLOG_TIMEOUT_S), state.db.session(write=False) as db:
            counts = list(
                await db.execute(
                    select(Job.kind, func.count(), func.min(Job.run_after))
                    .where(Job.status == "queued")
                    .group_by(Job.kind)
                )
            )
    except Exception:  # noqa: BLE001 (a scrape must not fail with the database)
        return
    gauge = state.metrics.jobs_queued
    gauge.clear()
    oldest = 0.0
    for kind, count, first_due in counts:
        gauge.labels(kind).set(count)
        if first_due is not None:
            oldest = max(oldest, (now - first_due).total_seconds())
    state.metrics.jobs_oldest_due.set(oldest)
    state.metrics.jobs_read_at.set(now.timestamp())
