"""Operations endpoints: liveness, readiness, metrics."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get
from sqlalchemy import text

from tellback_server.http.deps import app_state
from tellback_server.http.errors import problem_response
from tellback_server.storage.base import StorageError


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
    except StorageError:
        return problem_response(
            request,
            503,
            "storage_unavailable",
            "object storage unreachable",
            headers={"Retry-After": "5"},
        )
    return Response(content=Health(status="ready"))


@get("/metrics", tags=["ops"], summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    return app_state(request).metrics.render()
