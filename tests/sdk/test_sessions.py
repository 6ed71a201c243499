"""Sessions: lazy, persisted, renewed once on 401; identify merges, logout isolates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tellback_sdk import AsyncClient, AsyncMobileClient, AuthenticationError, Client
from tests.sdk.conftest import BASE, FAST, AsyncFaultTransport, Faults, InProcess, Live, posts_to
from tests.server.conftest import identity_token

SESSIONS = "POST /v1/client/sessions"


def client(server: InProcess, data_dir: Path, faults: Faults, **kw: Any) -> AsyncClient:
    return AsyncClient(
        BASE,
        server.app.app_key,
        data_dir=data_dir,
        transport=AsyncFaultTransport(server.asgi, faults),
        retry_policy=FAST,
        **kw,
    )


def token(server: InProcess, sub: str, **claims: Any) -> str:
    return identity_token(server.app.identity_secret, sub, kid=server.app.identity_kid, **claims)


async def test_session_is_lazy_and_survives_a_restart(server: InProcess, tmp_path: Path) -> None:
    faults = Faults()
    async with client(server, tmp_path, faults) as tb:
        assert faults.log == []
        await tb.me.get()
        installation = tb.installation_id
    assert faults.log == [SESSIONS, "GET /v1/client/me"]
    async with client(server, tmp_path, faults) as tb:
        assert tb.installation_id == installation
        await tb.me.get()
    assert faults.log.count(SESSIONS) == 1


async def test_401_renews_the_session_once(server: InProcess, tmp_path: Path) -> None:
    faults = Faults()
    async with client(server, tmp_path, faults) as tb:
        user = await tb.me.get()
        key = tb._core._session_key
        stale = {**tb._core.store.get(key), "token": "tbs_revoked"}
    async with client(server, tmp_path, faults) as tb:
        tb._core.store.set(key, stale)
        tb._core.session = tb._core._load_session()
        assert (await tb.me.get()).id == user.id  # same installation, same anonymous user
    assert faults.log.count(SESSIONS) == 2


async def test_a_second_401_is_surfaced(tmp_path: Path) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/client/sessions":
            return httpx.Response(
                201,
                json={
                    "session_token": "tbs_x",
                    "expires_at": "2099-01-01T00:00:00Z",
                    "user": {"id": "u1"},
                },
            )
        return httpx.Response(401, json={"status": 401, "code": "unauthenticated"})

    async with AsyncClient(
        BASE, "tbk_x", data_dir=tmp_path, transport=httpx.MockTransport(handler)
    ) as tb:
        with pytest.raises(AuthenticationError):
            await tb.me.get()
    assert calls == ["/v1/client/sessions", "/v1/client/me"] * 2


async def test_identify_merges_and_logout_isolates(server: InProcess, tmp_path: Path) -> None:
    faults = Faults()
    async with client(server, tmp_path, faults) as tb:
        conv = await tb.conversations.create("before login")
        await tb.identify(token(server, "user-42", name="Grace"))
        me = await tb.me.get()
        assert (me.external_id, me.name) == ("user-42", "Grace")
        assert [c.id async for c in tb.conversations.list()] == [conv.id]
        result = await tb.logout()
        assert result.discarded == 0
        assert (await tb.me.get()).external_id is None
        assert [c.id async for c in tb.conversations.list()] == []
        # Logging in again brings the user's conversations back.
        await tb.identify(token(server, "user-42"))
        assert [c.id async for c in tb.conversations.list()] == [conv.id]


async def test_async_token_callable_and_constructor_token(
    server: InProcess, tmp_path: Path
) -> None:
    calls = 0

    async def fetch_token() -> str:
        nonlocal calls
        calls += 1
        return token(server, "cb-user")

    async with client(server, tmp_path / "a", Faults(), user_token=fetch_token) as tb:
        assert (await tb.me.get()).external_id == "cb-user"
    assert calls == 1
    # An anonymous install that is later started with a token is identified (and merged).
    async with client(server, tmp_path / "b", Faults()) as tb:
        conv = await tb.conversations.create("anonymous first")
    async with client(server, tmp_path / "b", Faults(), user_token=token(server, "u-b")) as tb:
        assert (await tb.me.get()).external_id == "u-b"
        assert [c.id async for c in tb.conversations.list()] == [conv.id]


async def test_logout_sends_queued_feedback_first_or_drops_it(
    server: InProcess, tmp_path: Path
) -> None:
    _, agent = await server.api.create_agent(server.app)
    online = Faults()
    async with AsyncMobileClient(
        BASE,
        server.app.app_key,
        data_dir=tmp_path / "online",
        transport=AsyncFaultTransport(server.asgi, online),
        retry_policy=FAST,
        auto_flush=False,
        user_token=token(server, "alice"),
    ) as tb:
        await tb.me.get()
        await tb.conversations.create("queued by alice")
        assert (await tb.logout()).discarded == 0
    [conv] = await server.conversations(agent)
    assert conv["end_user"]["external_id"] == "alice"

    offline = Faults(only=posts_to("/v1/client/conversations"), drop_before=1.0)
    async with AsyncMobileClient(
        BASE,
        server.app.app_key,
        data_dir=tmp_path / "offline",
        transport=AsyncFaultTransport(server.asgi, offline),
        retry_policy=FAST,
        auto_flush=False,
        user_token=token(server, "bob"),
    ) as tb:
        await tb.me.get()
        await tb.conversations.create("queued by bob, never sent")
        assert (await tb.logout()).discarded == 1
        offline.drop_before = 0.0
        assert (await tb.outbox.flush()).sent == 0
        assert tb.outbox.pending() == []
    assert len(await server.conversations(agent)) == 1


def test_sync_identify_logout_and_persisted_login(live: Live, tmp_path: Path) -> None:
    app = live.create_app()

    def signed(sub: str) -> str:
        return identity_token(app["identity_secret"], sub, kid=app["identity_kid"])

    with Client(live.url, app["app_key"], data_dir=tmp_path, retry_policy=FAST) as tb:
        conv = tb.conversations.create("anonymous, then merged")
        tb.identify(signed("sync-user"))
    # A restart without a token keeps the login (the app calls logout() to end it).
    with Client(live.url, app["app_key"], data_dir=tmp_path, retry_policy=FAST) as tb:
        assert tb.me.get().external_id == "sync-user"
        assert [c.id for c in tb.conversations.list()] == [conv.id]
        tb.logout()
        assert tb.me.get().external_id is None
        assert list(tb.conversations.list()) == []


async def test_text_with_the_nul_character_is_sent_without_it(
    server: InProcess, tmp_path: Path
) -> None:
    """The server refuses U+0000 (PostgreSQL cannot store it); feedback whose log
    excerpt holds one is sent without it rather than refused, and nothing else moves:
    an escaped backslash before "u0000" is text and stays."""
    faults = Faults()
    async with client(server, tmp_path, faults) as tb:
        conv = await tb.conversations.create(
            "crash\x00 in C:\\u0000", context={"extra": {"log\x00": "a\x00\x00b"}}
        )
    assert conv.last_message is not None
    assert conv.last_message.body == "crash in C:\\u0000"
    _, agent = await server.api.create_agent(server.app)
    r = await server.api.http.get(f"/v1/agent/conversations/{conv.id}", headers=agent)
    assert r.json()["context"]["extra"] == {"log": "ab"}
