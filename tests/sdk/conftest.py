"""Fixtures for SDK tests: the real server in-process (async client) or as a live
`tellback serve` process on 127.0.0.1 (sync client), and a fault-injecting transport.

Each test gets its own app with rate limits off (unless it asks for them), so tests
never see each other's conversations.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tellback_sdk import RetryPolicy
from tellback_server.jobs.registry import JobRegistry
from tests.server.conftest import Api, AppInfo, make_settings, serve_app

BASE = "http://127.0.0.1:8080"
NO_LIMITS = {"app_per_minute": 0, "user_per_minute": 0}
# Tests must fail fast, not sleep: tiny backoff, and Retry-After capped everywhere.
FAST = RetryPolicy(
    max_retries=4, base=0.001, cap=0.005, max_retry_after=0.02, outbox_max_retry_after=0.02
)


class Killed(BaseException):
    """The app process dies here (no SDK handler catches a BaseException)."""


@dataclass
class Faults:
    """Decides, per request, whether to break it: before the server sees it, after the
    server committed (the response is lost), or with a synthetic 503/429."""

    rng: random.Random = field(default_factory=lambda: random.Random(7))
    drop_before: float = 0.0
    drop_after: float = 0.0
    kill_after: float = 0.0
    only: Callable[[httpx.Request], bool] = lambda _r: True
    script: list[str] = field(default_factory=list)  # actions consumed one per request
    counts: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)  # "METHOD /path" of every request
    stored_parts: list[int] = field(default_factory=list)  # upload parts the server took

    def answered(self, request: httpx.Request, response: httpx.Response) -> None:
        if request.method == "PUT" and response.status_code == 200:
            self.stored_parts.append(int(request.url.params.get("part", "0")))

    def action(self, request: httpx.Request) -> str:
        self.log.append(f"{request.method} {request.url.path}")
        if not self.only(request):
            return "pass"
        if self.script:
            act = self.script.pop(0)
        else:
            roll = self.rng.random()
            edges = [
                ("drop_before", self.drop_before),
                ("drop_after", self.drop_after),
                ("kill_after", self.kill_after),
            ]
            act, total = "pass", 0.0
            for name, rate in edges:
                total += rate
                if roll < total:
                    act = name
                    break
        self.counts[act] = self.counts.get(act, 0) + 1
        return act

    @staticmethod
    def synthetic(act: str, request: httpx.Request) -> httpx.Response:
        status = int(act.split(":")[1])
        code = {429: "rate_limited", 503: "service_unavailable"}.get(status, "internal_error")
        return httpx.Response(
            status,
            headers={"Retry-After": "1", "Content-Type": "application/problem+json"},
            json={"type": "about:blank", "title": "x", "status": status, "code": code},
            request=request,
        )


class AsyncFaultTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        act = self.faults.action(request)
        if act == "drop_before":
            raise httpx.ConnectError("injected: connection refused", request=request)
        if act == "kill_before":
            raise Killed
        if act.startswith("status:"):
            return Faults.synthetic(act, request)
        response = await self.inner.handle_async_request(request)
        if act != "pass":
            await response.aread()
        self.faults.answered(request, response)
        if act in {"drop_after", "kill_after"}:
            await response.aread()  # the server finished (and committed) the request
            if act == "kill_after":
                raise Killed
            raise httpx.ReadError("injected: connection reset", request=request)
        return response


class SyncFaultTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        act = self.faults.action(request)
        if act == "drop_before":
            raise httpx.ConnectError("injected: connection refused", request=request)
        if act == "kill_before":
            raise Killed
        if act.startswith("status:"):
            return Faults.synthetic(act, request)
        response = self.inner.handle_request(request)
        self.faults.answered(request, response)
        if act in {"drop_after", "kill_after"}:
            response.read()
            response.close()
            if act == "kill_after":
                raise Killed
            raise httpx.ReadError("injected: connection reset", request=request)
        return response


@dataclass
class InProcess:
    api: Api
    app: AppInfo

    @property
    def asgi(self) -> httpx.AsyncBaseTransport:
        return self.api.http._transport

    async def conversations(self, agent_headers: dict[str, str]) -> list[dict[str, Any]]:
        """Every conversation of the app, read through the agent API (server truth)."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"app_id": self.app.id, "limit": 100}
            if cursor:
                params["cursor"] = cursor
            r = await self.api.http.get(
                "/v1/agent/conversations", params=params, headers=agent_headers
            )
            assert r.status_code == 200, r.text
            items += r.json()["items"]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                return items


def posts_to(path: str) -> Callable[[httpx.Request], bool]:
    return lambda r: r.method == "POST" and r.url.path == path


@pytest.fixture
async def server(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[InProcess]:
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    settings = make_settings(f"sqlite+aiosqlite:///{db}", tmp_path / "server-data", port=8080)
    async with serve_app(settings, JobRegistry(), base_url=BASE) as api:
        app = await api.create_app("SDK tests", rate_limits=NO_LIMITS)
        yield InProcess(api, app)


# ----- a live server for the sync client ------------------------------------------------


@dataclass
class Live:
    url: str
    admin_token: str

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def create_app(self, **settings: Any) -> dict[str, Any]:
        body = {"name": "SDK sync", "settings": {"rate_limits": NO_LIMITS, **settings}}
        r = httpx.post(f"{self.url}/v1/admin/apps", json=body, headers=self.admin())
        assert r.status_code == 201, r.text
        data: dict[str, Any] = r.json()
        return data

    def create_agent(self, app_id: str) -> dict[str, str]:
        r = httpx.post(
            f"{self.url}/v1/admin/agents",
            json={"name": "Ada", "app_ids": [app_id]},
            headers=self.admin(),
        )
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def conversations(self, app_id: str, agent: dict[str, str]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"app_id": app_id, "limit": 100}
            if cursor:
                params["cursor"] = cursor
            r = httpx.get(f"{self.url}/v1/agent/conversations", params=params, headers=agent)
            assert r.status_code == 200, r.text
            items += r.json()["items"]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                return items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _serve(base: Path, *, worker: bool = False, **env_extra: str) -> Iterator[Live]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELLBACK_")}
    env.update(TELLBACK_DATA_DIR=str(base / "data"), TELLBACK_SECRET_KEY="s" * 40, **env_extra)
    out = (base / "stdout").open("w+")
    command = [
        sys.executable,
        "-m",
        "tellback_server",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if not worker:
        command.append("--no-worker")
    proc = subprocess.Popen(command, cwd=base, env=env, stdout=out, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError("tellback serve exited early")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("tellback serve did not become ready")
            time.sleep(0.1)
        token = next(
            line.strip()
            for line in (base / "stdout").read_text().splitlines()
            if line.startswith("tba_")
        )
        yield Live(url, token)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """`tellback serve` on 127.0.0.1 with its own data dir; stopped at session end."""
    with _serve(tmp_path_factory.mktemp("live-server")) as server:
        yield server


@pytest.fixture(scope="session")
def live_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """`tellback serve` with its job worker (polling fast) and webhooks to 127.0.0.1
    allowed: for webhook deliveries end to end."""
    with _serve(
        tmp_path_factory.mktemp("live-worker"),
        worker=True,
        TELLBACK_WEBHOOK_ALLOW_PRIVATE="true",
        TELLBACK_WORKER_POLL_SECONDS="0.2",
    ) as server:
        yield server
