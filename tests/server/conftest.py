"""An in-process app on a fresh database, with helpers that speak the public API."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from litestar import Litestar
from sqlalchemy import text

from tellback_server.asgi import build_state, create_app
from tellback_server.db.models import AdminToken
from tellback_server.jobs.registry import JobRegistry
from tellback_server.security import ADMIN_TOKEN_PREFIX, hash_token, new_token
from tellback_server.settings import S3Settings, Settings
from tellback_server.state import AppState

SECRET = "test-secret-key-0123456789abcdef0123456789"


def make_settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        secret_key=SECRET,
        worker_poll_seconds=0.5,
        **overrides,
    )


def identity_token(
    secret: str, sub: str, *, kid: str | None, exp_in: int = 600, **claims: Any
) -> str:
    headers = {"kid": kid} if kid else None
    payload = {"sub": sub, "exp": int(time.time()) + exp_in, **claims}
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers)


@dataclass
class AppInfo:
    id: str
    app_key: str
    identity_secret: str
    identity_kid: str
    raw: dict[str, Any]


@dataclass
class Api:
    """Test helper: a client of the public API with an admin token."""

    http: httpx.AsyncClient
    state: AppState
    admin_token: str
    _installations: list[str] = field(default_factory=list)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @staticmethod
    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def create_app(self, name: str = "Demo", **settings: Any) -> AppInfo:
        body: dict[str, Any] = {"name": name}
        if settings:
            body["settings"] = settings
        r = await self.http.post("/v1/admin/apps", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        data = r.json()
        return AppInfo(
            data["id"], data["app_key"], data["identity_secret"], data["identity_kid"], data
        )

    async def session(
        self,
        app: AppInfo,
        installation_id: str | None = None,
        user_token: str | None = None,
        expect: int = 201,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "app_key": app.app_key,
            "installation_id": installation_id or uuid.uuid4().hex,
            "device": {"platform": "ios", "model": "iPhone15,2", "os_version": "18.1"},
        }
        if user_token is not None:
            body["user_token"] = user_token
        r = await self.http.post("/v1/client/sessions", json=body)
        assert r.status_code == expect, r.text
        data: dict[str, Any] = r.json()
        return data

    async def user_headers(self, app: AppInfo, **kwargs: Any) -> dict[str, str]:
        return self.bearer((await self.session(app, **kwargs))["session_token"])

    async def create_agent(self, *apps: AppInfo, name: str = "Ada") -> tuple[str, dict[str, str]]:
        r = await self.http.post(
            "/v1/admin/agents",
            json={"name": name, "email": "ada@example.com", "app_ids": [a.id for a in apps]},
            headers=self.admin,
        )
        assert r.status_code == 201, r.text
        return r.json()["id"], self.bearer(r.json()["token"])

    async def feedback(
        self, headers: dict[str, str], body: str = "The app crashes", **extra: Any
    ) -> dict[str, Any]:
        r = await self.http.post(
            "/v1/client/conversations", json={"body": body, **extra}, headers=headers
        )
        assert r.status_code == 201, r.text
        data: dict[str, Any] = r.json()
        return data


async def _admin_token(state: AppState) -> str:
    token = new_token(ADMIN_TOKEN_PREFIX)
    async with state.db.session(write=True) as db:
        db.add(AdminToken(name="tests", token_hash=hash_token(token)))
    return token


@pytest.fixture
def registry() -> JobRegistry:
    return JobRegistry()


@pytest.fixture
async def api(database_url: str, tmp_path: Path, registry: JobRegistry) -> AsyncIterator[Api]:
    async with serve_app(make_settings(database_url, tmp_path / "data"), registry) as api:
        yield api


@asynccontextmanager
async def serve_app(
    settings: Settings, registry: JobRegistry, base_url: str = "http://tellback.test"
) -> AsyncIterator[Api]:
    """The app in this event loop (tests may also use state.db), with an admin token."""
    state = build_state(settings)
    app = create_app(settings, registry=registry, state=state)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url=base_url) as client,
    ):
        yield Api(http=client, state=state, admin_token=await _admin_token(state))


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    """Run the app's lifespan in a task of its own (anyio scopes must exit in their task)."""
    started, stop = asyncio.Event(), asyncio.Event()

    async def run() -> None:
        async with app.lifespan():
            started.set()
            await stop.wait()

    task = asyncio.create_task(run())
    await asyncio.wait(
        [task, asyncio.create_task(started.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    if task.done():
        task.result()
    try:
        yield
    finally:
        stop.set()
        await task


@asynccontextmanager
async def processes(
    database_url: str, tmp_path: Path, n: int = 2, **overrides: Any
) -> AsyncIterator[list[Api]]:
    """``n`` apps on one PostgreSQL database, standing for ``tellback serve`` processes:
    each with its engine, caches, limiter and LISTEN connection of its own. Skipped on
    SQLite, which runs one API process."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite runs one API process")
    from tellback_server.plugins import build_registry

    settings = make_settings(database_url, tmp_path / "data", **overrides)
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(serve_app(settings, build_registry())) for _ in range(n)
        ]


async def listening_pids(state: AppState) -> list[int]:
    """The PostgreSQL backends of this database's LISTEN connections, each process's
    (``db/listen.py`` names them ``tellback listen``)."""
    async with state.db.session(write=False) as db:
        pids = await db.scalars(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'tellback listen'"
            )
        )
    return list(pids)


async def listening_backends(state: AppState) -> int:
    return len(await listening_pids(state))


def s3_settings(endpoint: str, **overrides: Any) -> S3Settings:
    """Settings for the test S3 server (`s3_endpoint`), in a bucket of its own."""
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

    return S3Settings(
        endpoint=endpoint,
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        bucket=f"tb-{uuid.uuid4().hex[:12]}",
        secure=False,
        region="us-east-1",
        **overrides,
    )


@pytest.fixture(params=["local", "s3"])
async def storage_api(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> AsyncIterator[Api]:
    """Like `api`, with the built-in job kinds, once on local disk and once on a real S3."""
    from tellback_server.plugins import build_registry

    overrides: dict[str, Any] = {"port": 8080}
    if request.param == "s3":
        overrides["s3"] = s3_settings(request.getfixturevalue("s3_endpoint"))
    settings = make_settings(database_url, tmp_path / "data", **overrides)
    # Local-disk URLs point at http://127.0.0.1:8080, which the client routes to the app.
    async with serve_app(settings, build_registry(), base_url="http://127.0.0.1:8080") as api:
        yield api
