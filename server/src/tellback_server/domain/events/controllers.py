"""``GET /v1/client/events`` and ``GET /v1/agent/events``: Server-Sent Events.

Neither handler takes the request transaction: a stream lives for hours and
must not hold a database connection (or SQLite's writer lock). Replay and the
periodic credential re-check use short sessions of their own.
"""

from __future__ import annotations

import datetime as dt
import weakref
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import Stream
from sqlalchemy import Select, select

from tellback_server.db.models import Agent, AgentApp, ClientSession
from tellback_server.domain.console import session as console_session
from tellback_server.domain.events.broker import Subscription
from tellback_server.domain.events.records import EventRecord
from tellback_server.domain.events.streams import (
    Recheck,
    agent_scope,
    client_scope,
    head,
    parse_last_event_id,
    replay,
    stream,
)
from tellback_server.http.deps import (
    AGENT,
    AGENT_AUTH,
    AGENT_TOKEN_HASH,
    CLIENT,
    CLIENT_AUTH,
    CONSOLE_COOKIE,
    AgentPrincipal,
    ClientPrincipal,
    address_key,
    app_state,
)
from tellback_server.state import AppState

_HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    # Tell nginx-style proxies not to buffer the stream.
    "X-Accel-Buffering": "no",
}
_DOC = (
    "Server-Sent Events (`text/event-stream`). Each event has `id:`, `event:` (its type) "
    "and `data:` (JSON `{id, type, timestamp, data}`). Resume with the `Last-Event-ID` "
    "header (or `last_event_id` query parameter); a comment heartbeat comes at least "
    "every 20 s; an `event: reset` means events were missed beyond the replay window "
    "and the client should reload, then resume from the reset's own `id:`."
)

_LastEventId = Annotated[
    str | None,
    QueryParameter(description="for clients that cannot send the Last-Event-ID header"),
]
_LastEventIdHeader = Annotated[
    str | None,
    HeaderParameter(
        name="Last-Event-ID",
        description="the id of the last event processed: the stream replays what followed it",
    ),
]


def _last_id(header: str | None, query: str | None) -> int | None:
    return parse_last_event_id(header or query)


async def _open(
    state: AppState,
    sub: Subscription,
    scope: Select[tuple[int]] | None,
    last: int | None,
    recheck: Recheck,
) -> Stream:
    """Replay (or the head id for a fresh stream), then the live stream; ``sub`` is
    already subscribed, so nothing committed meanwhile is missed."""
    backlog: list[EventRecord] = []
    reset = start = None
    try:
        if last is None:
            start = await head(state.db)
        elif scope is not None:
            backlog, reset = await replay(state.db, scope, last)
            if reset is not None:  # (the position to resume from after reloading)
                start = await head(state.db)
    except BaseException:
        state.events.unsubscribe(sub)
        raise
    content = stream(
        state.events,
        sub,
        backlog,
        reset,
        start_id=start,
        heartbeat_s=state.settings.sse_heartbeat_seconds,
        recheck=recheck,
    )
    # A client gone before its stream's first byte: the generator never starts, so its
    # `finally` never runs, and the subscription would count against the caps for ever.
    weakref.finalize(content, state.events.unsubscribe, sub)
    return Stream(content=content, media_type="text/event-stream", headers=_HEADERS)


class ClientEventsController(Controller):
    path = "/v1/client/events"
    tags = ["client"]
    security = [{"sessionToken": []}]
    dependencies = CLIENT
    middleware = CLIENT_AUTH

    @get(summary="Live events for this end user", description=_DOC, media_type="text/event-stream")
    async def events(
        self,
        request: Request[Any, Any, Any],
        client: NamedDependency[ClientPrincipal],
        last_event_id: _LastEventId = None,
        last_event_id_header: _LastEventIdHeader = None,
    ) -> Stream:
        state = app_state(request)
        last = _last_id(last_event_id_header, last_event_id)
        # (an IPv6 client by its /64, as the session limit counts it)
        address = address_key(request.client.host) if request.client is not None else None
        sub = state.events.subscribe_client(client.app_id, client.end_user_id, address)

        async def still_valid() -> bool:
            async with state.db.session(write=False) as db:
                expires = await db.scalar(
                    select(ClientSession.expires_at).where(
                        ClientSession.id == client.session_id, ClientSession.revoked_at.is_(None)
                    )
                )
            return expires is not None and expires > dt.datetime.now(dt.UTC)

        scope = client_scope(client.app_id, client.end_user_id)
        return await _open(state, sub, scope, last, still_valid)


class AgentEventsController(Controller):
    path = "/v1/agent/events"
    tags = ["agent"]
    security = [{"agentToken": []}]
    dependencies = AGENT
    middleware = AGENT_AUTH

    @get(
        summary="Live events for all the agent's apps",
        description=_DOC,
        media_type="text/event-stream",
    )
    async def events(
        self,
        request: Request[Any, Any, Any],
        agent: NamedDependency[AgentPrincipal],
        last_event_id: _LastEventId = None,
        last_event_id_header: _LastEventIdHeader = None,
    ) -> Stream:
        state = app_state(request)
        last = _last_id(last_event_id_header, last_event_id)
        sub = state.events.subscribe_agent(agent.agent_id, agent.app_ids)

        token_hash = request.scope["state"][AGENT_TOKEN_HASH]
        cookie = request.scope["state"].get(CONSOLE_COOKIE)

        async def still_valid() -> bool:
            # Disabled, its token rotated, moved to other apps, or (opened with the
            # console's cookie) signed out of the console or past the session's time:
            # end the stream; a reconnect gets the new scope, or is refused.
            if cookie is not None and not await console_session.signed_in(
                state.db, state.sealer, cookie
            ):
                return False
            async with state.db.session(write=False) as db:
                rows = (
                    await db.execute(
                        select(AgentApp.app_id)
                        .join(Agent, Agent.id == AgentApp.agent_id)
                        .where(
                            Agent.id == agent.agent_id,
                            Agent.disabled_at.is_(None),
                            Agent.token_hash == token_hash,
                        )
                    )
                ).all()
            return frozenset(r.app_id for r in rows) == agent.app_ids

        scope = agent_scope(agent.app_ids) if agent.app_ids else None
        return await _open(state, sub, scope, last, still_valid)
