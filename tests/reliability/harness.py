"""Helpers shared by the reliability tests: an in-process app whose ASGI callable is exposed
(so a test can open clients from several peer addresses), and a raw-socket health probe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import httpx
from litestar import Litestar

from tellback_server.asgi import build_state, create_app
from tellback_server.jobs.registry import JobRegistry
from tellback_server.settings import Settings
from tests.server.conftest import Api, _admin_token, lifespan


@dataclass
class Served:
    api: Api
    app: Litestar

    def client(self, peer: str) -> httpx.AsyncClient:
        """A client whose requests arrive from ``peer`` (the ASGI scope's client address)."""
        transport = httpx.ASGITransport(app=self.app, client=(peer, 40000))  # type: ignore[arg-type]
        return httpx.AsyncClient(transport=transport, base_url="http://tellback.test")


@asynccontextmanager
async def serve(settings: Settings, registry: JobRegistry | None = None) -> AsyncIterator[Served]:
    state = build_state(settings)
    app = create_app(settings, registry=registry or JobRegistry(), state=state)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://tellback.test") as client,
    ):
        api = Api(http=client, state=state, admin_token=await _admin_token(state))
        yield Served(api, app)


@dataclass
class Probe:
    """Polls ``/healthz`` on a live server every ``interval`` seconds; records latencies."""

    base_url: str
    interval: float = 0.2
    latencies: list[float] | None = None
    failures: int = 0
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        assert self.latencies is not None
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as http:
            while True:
                started = time.perf_counter()
                try:
                    r = await http.get("/healthz")
                    if r.status_code != 200:
                        self.failures += 1
                except httpx.HTTPError:
                    self.failures += 1
                self.latencies.append(time.perf_counter() - started)
                await asyncio.sleep(self.interval)

    async def __aenter__(self) -> Probe:
        self.latencies = []
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task

    @property
    def worst(self) -> float:
        return max(self.latencies or [0.0])
