"""Interactive calls under faults: one logical request, one effect on the server."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest

from tellback_sdk import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    Client,
    RateLimitError,
)
from tests.sdk.conftest import (
    BASE,
    FAST,
    AsyncFaultTransport,
    Faults,
    InProcess,
    Live,
    SyncFaultTransport,
    posts_to,
)


def client(server: InProcess, tmp_path: Path, faults: Faults, **kw: Any) -> AsyncClient:
    return AsyncClient(
        BASE,
        kw.pop("app_key", server.app.app_key),
        data_dir=tmp_path,
        transport=AsyncFaultTransport(server.asgi, faults),
        retry_policy=FAST,
        **kw,
    )


async def test_lost_answer_is_replayed_not_duplicated(server: InProcess, tmp_path: Path) -> None:
    _, agent = await server.api.create_agent(server.app)
    faults = Faults(
        only=posts_to("/v1/client/conversations"),
        script=["drop_after", "drop_before", "status:503", "drop_after"],
    )
    async with client(server, tmp_path, faults) as tb:
        conv = await tb.conversations.create("exactly once please")
    assert faults.log.count("POST /v1/client/conversations") == 5
    assert [c["id"] for c in await server.conversations(agent)] == [conv.id]


def test_sync_lost_answer_is_replayed_not_duplicated(live: Live, tmp_path: Path) -> None:
    app = live.create_app()
    agent = live.create_agent(app["id"])
    faults = Faults(only=posts_to("/v1/client/conversations"), script=["drop_after", "status:429"])
    with Client(
        live.url,
        app["app_key"],
        data_dir=tmp_path,
        transport=SyncFaultTransport(httpx.HTTPTransport(), faults),
        retry_policy=FAST,
    ) as tb:
        conv = tb.conversations.create("sync, exactly once")
    assert [c["id"] for c in live.conversations(app["id"], agent)] == [conv.id]


async def test_retry_budget_then_the_typed_error(server: InProcess, tmp_path: Path) -> None:
    faults = Faults(only=lambda r: r.url.path == "/v1/client/unread", script=["status:429"] * 9)
    async with client(server, tmp_path, faults) as tb:
        with pytest.raises(RateLimitError) as err:
            await tb.me.unread_count()
        assert err.value.retry_after == 1.0
    assert faults.log.count("GET /v1/client/unread") == 5  # first try + 4 retries


async def test_real_rate_limit_surfaces_with_retry_after(server: InProcess, tmp_path: Path) -> None:
    app = await server.api.create_app(
        "limited", rate_limits={"app_per_minute": 0, "user_per_minute": 1}
    )
    async with client(server, tmp_path, Faults(), app_key=app.app_key) as tb:
        await tb.me.unread_count()
        await tb.me.unread_count()
        with pytest.raises(RateLimitError) as err:
            await tb.me.unread_count()
        assert (err.value.retry_after or 0) >= 1
        assert err.value.request_id


async def test_a_request_without_a_key_is_never_repeated(server: InProcess, tmp_path: Path) -> None:
    faults = Faults(only=lambda r: r.method == "PATCH", drop_before=1.0)
    async with client(server, tmp_path, faults) as tb:
        with pytest.raises(APIConnectionError):
            await tb.me.update(name="Ada")
    assert faults.log.count("PATCH /v1/client/me") == 1


async def test_timeouts_retry_then_raise(tmp_path: Path) -> None:
    counter = itertools.count()

    def handler(request: httpx.Request) -> httpx.Response:
        next(counter)
        raise httpx.ReadTimeout("slow", request=request)

    async with AsyncClient(
        BASE, "tbk", data_dir=tmp_path, transport=httpx.MockTransport(handler), retry_policy=FAST
    ) as tb:
        with pytest.raises(APITimeoutError):
            await tb.config.get()
    assert next(counter) == 5  # the session POST is safe to repeat too


async def test_pagination_is_lazy(server: InProcess, tmp_path: Path) -> None:
    faults = Faults()
    async with client(server, tmp_path, faults) as tb:
        created = [(await tb.conversations.create(f"c{i}")).id for i in range(7)]
        pager = tb.conversations.list(limit=3)
        first = [c.id async for c in _take(pager, 2)]
        assert faults.log.count("GET /v1/client/conversations") == 1
        assert first == created[::-1][:2]
        sizes = [len(p.items) async for p in pager.pages()]
        assert sizes == [3, 3, 1]
        assert [c.id async for c in pager] == created[::-1]


async def _take(pager: Any, n: int) -> Any:
    count = 0
    async for item in pager:
        yield item
        count += 1
        if count == n:
            return
