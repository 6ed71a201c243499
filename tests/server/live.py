"""The app on a real socket (uvicorn in this event loop), for streaming responses.

httpx's ASGI transport buffers a whole response, so SSE needs a real server.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from tellback_server.asgi import build_state, create_app
from tellback_server.http.server import Server
from tellback_server.jobs.registry import JobRegistry
from tellback_server.settings import Settings
from tests.server.conftest import Api, _admin_token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LiveApi(Api):
    base_url: str = ""
    server: Server | None = None


@asynccontextmanager
async def live_app(
    settings: Settings, registry: JobRegistry | None = None
) -> AsyncIterator[LiveApi]:
    port = free_port()
    state = build_state(settings)
    app = create_app(settings, registry=registry or JobRegistry(), state=state)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = Server(config, on_stop=state.events.close)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            yield LiveApi(
                http=http,
                state=state,
                admin_token=await _admin_token(state),
                base_url=base,
                server=server,
            )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: dict[str, Any]


@dataclass
class SseReader:
    """Reads an SSE response into events; comments (heartbeats) are counted."""

    response: httpx.Response
    comments: list[str] = field(default_factory=list)
    bare_ids: list[str] = field(default_factory=list)  # id-only blocks (resume points)
    _lines: AsyncIterator[str] | None = None

    async def next(self, wait: float = 5.0) -> SseEvent:
        return await asyncio.wait_for(self._next(), wait)

    async def _next(self) -> SseEvent:
        if self._lines is None:
            self._lines = self.response.aiter_lines()
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line == "":
                if "data" in fields:
                    return SseEvent(
                        fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
                    )
                if "id" in fields:
                    self.bare_ids.append(fields["id"])
                fields = {}
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        raise EOFError("the stream ended")

    async def events_until(self, type_: str, wait: float = 5.0) -> list[SseEvent]:
        out: list[SseEvent] = []
        while True:
            event = await self.next(wait)
            out.append(event)
            if event.event == type_:
                return out


@asynccontextmanager
async def sse(
    http: httpx.AsyncClient, path: str, headers: dict[str, str], **params: Any
) -> AsyncIterator[SseReader]:
    async with http.stream("GET", path, headers=headers, params=params, timeout=30) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = SseReader(response)
        yield reader
