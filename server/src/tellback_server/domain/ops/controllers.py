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
READY_TIMEOUT_S = 3.0  # set a probe's own timeout above it (Kubernetes' default is 1 s)


class Health(msgspec.Struct):
    status: str


@get("/healthz", tags=["ops"], summary="Process is up")
async def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", tags=["ops"], summary="Database (and storage) reachable")
async def readyz(request: Request[Any, Any, Any]) -> Response[Any]:
    # Answers within READY_TIMEOUT_S: a stalled database or storage (connections
    # accepted, never answered) is not ready, and a probe that waits past its own
    # timeout tells the orchestrator nothing. (A comment: the OpenAPI document shows
    # handlers' docstrings.)
    state = app_state(request)
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    try:
        async with asyncio.timeout_at(deadline), state.db.session(write=False) as db:
            await db.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 (any failure means not ready)
        detail = "database unreachable"
        if isinstance(exc, TimeoutError):
            detail = f"database did not answer within {READY_TIMEOUT_S:g} s"
        return _unready(request, "service_unavailable", detail)
    try:
        async with asyncio.timeout_at(deadline):
            await state.store.ping()
    except TimeoutError:
        return _unready(
            request,
            "storage_unavailable",
            f"object storage did not answer within {READY_TIMEOUT_S:g} s",
        )
    except StorageError as exc:
        # Its reason (unreachable, or an S3 error code such as SignatureDoesNotMatch for
        # wrong credentials), never a key: what an operator needs to tell the two apart.
        return _unready(request, "storage_unavailable", str(exc))
    return Response(content=Health(status="ready"))


def _unready(request: Request[Any, Any, Any], code: str, detail: str) -> Response[Any]:
    return problem_response(request, 503, code, detail, headers={"Retry-After": "5"})


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
