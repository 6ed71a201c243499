"""Rate limits shared by the API processes on PostgreSQL (``ratelimit.SharedLimits``).

Two apps built on one database stand for two ``tellback serve`` processes: each has
its own limiter and its own sync. The tests drive the syncs by hand where the exact
account matters, and leave them to their background task where the bound does.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import make_url, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from tellback_server.db.models.ops import rate_limits
from tellback_server.http.deps import address_key
from tellback_server.ratelimit import SharedLimits
from tellback_server.settings import SettingsError, load_settings
from tests.server.conftest import Api, processes

pytestmark = pytest.mark.timeout(60)


def _shared(api: Api) -> SharedLimits:
    shared = api.state.shared_limits
    assert shared is not None
    return shared


def _session(app_key: str) -> dict[str, Any]:
    return {"app_key": app_key, "installation_id": str(uuid.uuid4()), "device": {"platform": "ios"}}


async def _new_session(api: Api, app_key: str) -> int:
    """One new session; every request of these tests comes from one client address (the
    ASGI transport's), which the address limit is keyed on."""
    r = await api.http.post("/v1/client/sessions", json=_session(app_key))
    assert r.status_code in (201, 429), r.text
    if r.status_code == 429:
        assert r.json()["code"] == "rate_limited"
        assert int(r.headers["retry-after"]) >= 1
    return r.status_code


async def test_two_processes_syncing_after_each_request_admit_what_one_would(
    database_url: str, tmp_path: Path
) -> None:
    """60 new sessions a minute from one address, a ten-second burst: one process admits
    11 at once (the burst and the request at its edge), then one a second. Alternating
    between two processes that sync after each request admits the same, not twice it."""
    async with processes(
        database_url, tmp_path, sessions_per_ip_per_minute=60, rate_limit_sync_seconds=60
    ) as (a, b):
        app = await a.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
        statuses = []
        for i in range(30):
            api = (a, b)[i % 2]
            statuses.append(await _new_session(api, app.app_key))
            await _shared(api).sync()
        admitted = statuses.count(201)
        assert 10 <= admitted <= 12, statuses
        assert statuses[-1] == 429
        # Both processes refuse now, whichever the address reaches next.
        for api in (a, b):
            await _shared(api).sync()
            assert await _new_session(api, app.app_key) == 429


async def test_without_sharing_each_process_admits_its_own_burst(
    database_url: str, tmp_path: Path
) -> None:
    """The control: ``TELLBACK_RATE_LIMIT_SYNC_SECONDS=0`` turns sharing off, and the same
    alternating flood gets one burst per process."""
    async with processes(
        database_url, tmp_path, sessions_per_ip_per_minute=60, rate_limit_sync_seconds=0
    ) as (a, b):
        assert a.state.shared_limits is None
        app = await a.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
        statuses = [await _new_session((a, b)[i % 2], app.app_key) for i in range(30)]
        assert statuses.count(201) >= 20, statuses


async def test_background_syncs_hold_three_processes_to_one_rate(
    database_url: str, tmp_path: Path
) -> None:
    """An address that spent its burst on one process, then floods three at once for
    three seconds with the syncs left to their task (every 0.1 s here): together they
    admit about the rate, where alone the two fresh ones would each admit a whole burst
    and each process the rate."""
    per_minute, seconds = 600, 3.0
    rate, burst = per_minute / 60, per_minute / 6  # 10 a second, ten seconds' worth
    async with processes(
        database_url,
        tmp_path,
        n=3,
        sessions_per_ip_per_minute=per_minute,
        rate_limit_sync_seconds=0.1,
    ) as apis:
        app = await apis[0].create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
        while await _new_session(apis[0], app.app_key) == 201:
            pass
        await _shared(apis[0]).sync()
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds

        async def flood(api: Api) -> list[int]:
            got = []
            while loop.time() < end:
                got.append(await _new_session(api, app.app_key))
            return got

        results = await asyncio.gather(*(flood(api) for api in apis))
    admitted = sum(r.count(201) for r in results)
    alone = 2 * burst + 3 * rate * seconds  # 290
    # The rate, plus what each fresh process admitted before its first sync.
    assert rate * seconds / 2 <= admitted <= rate * seconds + burst, (admitted, alone, results)
    assert all(429 in r for r in results)


async def test_counts_are_kept_as_keyed_hashes_and_pruned(
    database_url: str, tmp_path: Path
) -> None:
    """The shared table holds no client address, and a key whose time has passed goes."""
    async with processes(database_url, tmp_path, n=1, rate_limit_sync_seconds=60) as (a,):
        app = await a.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
        stale = uuid.uuid4().bytes
        async with a.state.db.engine.begin() as conn:
            await conn.execute(rate_limits.insert().values(key=stale, tat=1.0))
        assert await _new_session(a, app.app_key) == 201
        shared = _shared(a)
        shared._prune_every = 0.0
        await shared.sync()
        async with a.state.db.engine.connect() as conn:
            keys = (await conn.execute(select(rate_limits.c.key))).scalars().all()
        assert len(keys) == 1, "the stale key was not pruned"
        assert len(keys[0]) == 16
        assert b"127.0.0.1" not in keys[0]
        async with a.state.db.engine.connect() as conn:
            persistence = await conn.scalar(
                text("SELECT relpersistence FROM pg_class WHERE relname = 'rate_limits'")
            )
        assert persistence == b"u", "rate_limits is not UNLOGGED"


async def test_a_failed_sync_keeps_its_counts_for_the_next(
    database_url: str, tmp_path: Path
) -> None:
    """The database away for two syncs: the process limits alone, logs once, and the next
    sync carries what it admitted meanwhile."""
    async with processes(
        database_url, tmp_path, sessions_per_ip_per_minute=60, rate_limit_sync_seconds=60
    ) as (a, b):
        app = await a.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
        shared = _shared(a)
        real = shared._engine
        away = create_async_engine(make_url(database_url).set(database="no_such_database"))
        shared._engine = away
        try:
            with structlog.testing.capture_logs() as logs:
                for _ in range(2):
                    for _ in range(3):
                        assert await _new_session(a, app.app_key) == 201
                    with pytest.raises(Exception, match="no_such_database"):
                        await shared.sync()
                shared._engine = real
                await shared.sync()
        finally:
            await away.dispose()
        assert [e["event"] for e in logs if e["event"].startswith("ratelimit.")] == [
            "ratelimit.sync_failed",
            "ratelimit.sync_recovered",
        ]
        # b hears of all six at its first sync (after its own first request): the burst
        # of eleven has four left, and a second or so refills one.
        statuses = [await _new_session(b, app.app_key)]
        await _shared(b).sync()
        statuses += [await _new_session(b, app.app_key) for _ in range(10)]
        assert 5 <= statuses.count(201) <= 6, statuses


def test_the_sync_interval_is_a_setting() -> None:
    assert load_settings({}).rate_limit_sync_seconds == 0.5
    assert load_settings({"TELLBACK_RATE_LIMIT_SYNC_SECONDS": "0"}).rate_limit_sync_seconds == 0
    with pytest.raises(SettingsError, match="TELLBACK_RATE_LIMIT_SYNC_SECONDS"):
        load_settings({"TELLBACK_RATE_LIMIT_SYNC_SECONDS": "soon"})


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("testclient", "testclient"),
    ],
)
def test_an_ipv6_client_is_limited_by_its_64(host: str, key: str) -> None:
    """New sessions were limited per address: an IPv6 host picks any of its /64's
    2**64 addresses, and had as many budgets."""
    assert address_key(host) == key
