"""Request dependencies: the transaction, and who is calling.

A request is one transaction (committed after the handler returns, before the
response is built, so a failed commit is an error response). Who is calling is
settled before it, from the hashed bearer token (:class:`Authenticate`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from uuid import UUID

import msgspec
import structlog
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send
from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.db.models import AdminToken, Agent, AgentApp, App, ClientSession, EndUser
from tellback_server.db.prepared import Prepared
from tellback_server.domain.console import session as console_session
from tellback_server.domain.webhooks.outbox import any_endpoint
from tellback_server.http.errors import RateLimited, Unauthenticated
from tellback_server.security import (
    ADMIN_TOKEN_PREFIX,
    AGENT_TOKEN_PREFIX,
    SESSION_TOKEN_PREFIX,
    hash_token,
)
from tellback_server.state import AppState

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class AdminPrincipal:
    token_id: UUID

    @property
    def scope(self) -> str:
        return f"admin:{self.token_id}"


@dataclass(frozen=True, slots=True)
class AgentPrincipal:
    agent_id: UUID
    name: str
    app_ids: frozenset[UUID]

    @property
    def scope(self) -> str:
        return f"agent:{self.agent_id}"


class SessionUser(NamedTuple):
    """The end user as the views show them (the columns ``user_out`` reads), as the
    session's check read them."""

    id: UUID
    external_id: str | None
    name: str | None
    email: str | None
    attributes: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ClientPrincipal:
    session_id: UUID
    app_id: UUID
    end_user_id: UUID
    installation_pk: UUID
    app_settings: dict[str, Any]
    # Read with the session, for a new feedback on PostgreSQL to go without a read of its
    # own (``_create_alone``), whose statement writes only if they still hold: the end
    # user's row unchanged since (``user_updated_at``), and the app without webhooks.
    # None: not kept (attributes too large to keep with every cached check).
    user: SessionUser | None
    user_updated_at: dt.datetime
    app_hooked: bool  # the app had an enabled webhook endpoint
    # Spelled once, as the principal is cached: every request of the session uses them.
    scope: str = field(init=False)  # "user:<end_user_id>": idempotency keys, rate limit
    app_text: str = field(init=False)  # the app's id as text: logs, the app's rate limit

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", f"user:{self.end_user_id}")
        object.__setattr__(self, "app_text", str(self.app_id))


def app_state(connection: ASGIConnection[Any, Any, Any, Any]) -> AppState:
    state: AppState = connection.app.state["tb"]
    return state


async def provide_db(request: Request[Any, Any, Any]) -> AsyncIterator[AsyncSession]:
    state = app_state(request)
    async with state.db.session(write=request.method not in _READ_METHODS) as session:
        yield session


def _bearer(request: ASGIConnection[Any, Any, Any, Any], prefix: str, what: str) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated(f"missing Authorization: Bearer <{what}>")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(f"expected Authorization: Bearer <{what}>")
    if not token.startswith(prefix):
        raise Unauthenticated(f"this endpoint takes a {what}")
    return token


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Authentication runs in a route middleware (``Authenticate``), before the body is read
# and before any dependency: a refused request (401, 429) never opens the request's
# transaction, so it can neither hold SQLite's writer lock nor strand a pooled
# connection. Each check looks the token up in a short read-only transaction of its own
# (or the per-process session cache) and leaves the principal in the request's state.


PRINCIPAL = "principal"  # the request state's key for who is calling
# ... and for the credential an agent's request came with (a long stream rechecks it)
AGENT_TOKEN_HASH = "agent_token_hash"  # noqa: S105 (a state key, not a secret)
CONSOLE_COOKIE = "console_cookie"
Authenticator = Callable[[ASGIConnection[Any, Any, Any, Any]], Awaitable[None]]


class Authenticate(ASGIMiddleware):
    """A route middleware that runs an authenticator before anything of the route.

    A Litestar guard would do the same, but Litestar hands every guard a copy of the
    route handler: about 25 µs per request, a tenth of what a request costs the
    framework and our plumbing together (bench_ingest's floor)."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, authenticate: Authenticator) -> None:
        self.authenticate = authenticate

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        await self.authenticate(ASGIConnection(scope, receive, send))
        await next_app(scope, receive, send)


ADMIN_LAST_USED_STEP = dt.timedelta(minutes=1)


async def authenticate_admin(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    token = _bearer(connection, ADMIN_TOKEN_PREFIX, "admin token")
    state = app_state(connection)
    async with state.db.session(write=False) as db:
        found = (
            await db.execute(
                select(AdminToken.id, AdminToken.last_used_at).where(
                    AdminToken.token_hash == hash_token(token), AdminToken.revoked_at.is_(None)
                )
            )
        ).first()
    if found is None:
        raise Unauthenticated("the admin token is not valid")
    token_id, last_used = found
    now = dt.datetime.now(dt.UTC)
    if last_used is None or now - last_used > ADMIN_LAST_USED_STEP:
        # What `tellback admin list-tokens` shows, to the minute: one write a minute at
        # most, on the operators' API, never on the apps' hot paths.
        async with state.db.session(write=True) as db:
            await db.execute(
                update(AdminToken).where(AdminToken.id == token_id).values(last_used_at=now)
            )
    structlog.contextvars.bind_contextvars(admin_token_id=str(token_id))
    connection.scope["state"][PRINCIPAL] = AdminPrincipal(token_id=token_id)


_AGENT = Prepared(
    select(Agent.id, Agent.name, AgentApp.app_id)
    .outerjoin(AgentApp, AgentApp.agent_id == Agent.id)
    .where(Agent.token_hash == bindparam("token_hash"), Agent.disabled_at.is_(None))
)


# An agent's token never expires by itself: a check is kept for the cache's lifetime.
_AGENT_NOT_AFTER = dt.datetime.max.replace(tzinfo=dt.UTC)


async def agent_by_token_hash(state: AppState, token_hash: str) -> AgentPrincipal | None:
    """The active agent whose token has this hash, with its apps (the one agent lookup:
    the API's authentication and the console's sign-in and pages all use it). A found
    agent is kept in the process's principal cache (``http/auth_cache.py``), which
    disabling the agent, changing its apps or rotating its token empties."""
    cached = state.principals.get(token_hash)
    if isinstance(cached, AgentPrincipal):
        return cached
    generation = state.principals.generation  # (a change of access meanwhile: not cached)
    async with state.db.transaction(write=False) as tx:
        rows = await tx.run(_AGENT.execute, {"token_hash": token_hash})
    if not rows:
        return None
    agent_id, name, _ = rows[0]
    app_ids = frozenset(app_id for _, _, app_id in rows if app_id is not None)
    principal = AgentPrincipal(agent_id=agent_id, name=name, app_ids=app_ids)
    state.principals.put(token_hash, principal, _AGENT_NOT_AFTER, generation)
    return principal


# The console's EventSource cannot send an Authorization header, so this one read-only
# stream also accepts the console's session cookie. No other route and no other method
# does: a cookie riding along on a forged cross-site POST or PATCH authorizes nothing.
_COOKIE_ROUTE = ("GET", "/v1/agent/events")


async def _agent_token_hash(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    route = (connection.scope.get("method"), connection.scope["path"].rstrip("/"))
    if "authorization" not in connection.headers and route == _COOKIE_ROUTE:
        state = app_state(connection)
        secure = console_session.is_secure(connection.url.scheme, state.settings.public_url)
        cookie = connection.cookies.get(console_session.cookie_name(secure))
        if cookie:
            opened = await console_session.signed_in(state.db, state.sealer, cookie)
            if opened is None:
                raise Unauthenticated("the console session has ended; sign in again")
            connection.scope["state"][CONSOLE_COOKIE] = cookie
            return opened.token_hash
    return hash_token(_bearer(connection, AGENT_TOKEN_PREFIX, "agent token"))


async def authenticate_agent(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    token_hash = await _agent_token_hash(connection)
    principal = await agent_by_token_hash(app_state(connection), token_hash)
    if principal is None:
        raise Unauthenticated("the agent token is not valid")
    connection.scope["state"][AGENT_TOKEN_HASH] = token_hash
    structlog.contextvars.bind_contextvars(agent_id=str(principal.agent_id))
    connection.scope["state"][PRINCIPAL] = principal


async def authenticate_client(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    token = _bearer(connection, SESSION_TOKEN_PREFIX, "session token")
    state = app_state(connection)
    token_hash = hash_token(token)
    principal = state.principals.get(token_hash)
    if not isinstance(principal, ClientPrincipal):
        principal = await _client_principal(state, token_hash)
    connection.scope["state"]["app_id"] = principal.app_text
    structlog.contextvars.bind_contextvars(app_id=principal.app_text)
    enforce_rate_limits(connection, principal.app_text, principal.app_settings, principal.scope)
    connection.scope["state"][PRINCIPAL] = principal


_SESSION = Prepared(
    select(
        ClientSession.id,
        ClientSession.app_id,
        ClientSession.installation_pk,
        ClientSession.expires_at,
        App.settings,
        any_endpoint(App.id),
        EndUser.updated_at,
        *(getattr(EndUser, k) for k in SessionUser._fields),
    )
    .join(App, App.id == ClientSession.app_id)
    .join(EndUser, EndUser.id == ClientSession.end_user_id)
    .where(ClientSession.token_hash == bindparam("token_hash"), ClientSession.revoked_at.is_(None))
)


async def _client_principal(state: AppState, token_hash: str) -> ClientPrincipal:
    generation = state.principals.generation  # (a change of access meanwhile: not cached)
    async with state.db.transaction(write=False) as tx:
        rows = await tx.run(_SESSION.execute, {"token_hash": token_hash})
    if not rows or rows[0][3] <= _now():
        raise Unauthenticated("the session is not valid or has expired; create a new session")
    session_id, app_id, installation_pk, expires_at, settings, hooked, updated_at = rows[0][:7]
    user = SessionUser._make(rows[0][7:])
    principal = ClientPrincipal(
        session_id=session_id,
        app_id=app_id,
        end_user_id=user.id,
        installation_pk=installation_pk,
        app_settings=settings or {},
        user=user if _small(user.attributes) else None,
        user_updated_at=updated_at,
        app_hooked=bool(hooked),
    )
    state.principals.put(token_hash, principal, expires_at, generation)
    return principal


# A cached check keeps the end user's attributes up to this size of JSON (they may be up
# to 50 x 1,000 characters): the cache holds up to 100,000 checks.
_KEPT_ATTRIBUTES = 2048


def _small(attributes: dict[str, Any] | None) -> bool:
    return not attributes or len(msgspec.json.encode(attributes)) <= _KEPT_ATTRIBUTES


def provide_admin(request: Request[Any, Any, Any]) -> AdminPrincipal:
    principal: AdminPrincipal = request.scope["state"][PRINCIPAL]
    return principal


def provide_agent(request: Request[Any, Any, Any]) -> AgentPrincipal:
    principal: AgentPrincipal = request.scope["state"][PRINCIPAL]
    return principal


def provide_client(request: Request[Any, Any, Any]) -> ClientPrincipal:
    principal: ClientPrincipal = request.scope["state"][PRINCIPAL]
    return principal


def enforce_rate_limits(
    request: ASGIConnection[Any, Any, Any, Any],
    app_id: UUID | str,
    settings: dict[str, Any],
    user_scope: str | None,
) -> None:
    """The end user's bucket (``user_scope``, ``ClientPrincipal.scope``), then the
    app's, each counting only requests the other lets through: one session flooding
    past its own limit spent the app's budget first, and every other user of the app
    got 429 (the app key is public, a session costs nothing)."""
    limits = settings.get("rate_limits") or {}
    limiter = app_state(request).limiter
    user_rate = int(limits.get("user_per_minute", 120))
    wait = None if user_scope is None else limiter.hit(user_scope, user_rate)
    if wait is None:
        wait = limiter.hit(f"app:{app_id}", int(limits.get("app_per_minute", 6000)))
        if wait is not None and user_scope is not None:
            limiter.refund(user_scope, user_rate)
    if wait is not None:
        raise RateLimited("too many requests; retry after the given delay", retry_after=wait)


def address_key(host: str) -> str:
    """Whom a per-address limit counts: an IPv4 address, or an IPv6 address's /64 (one
    host, or one home or mobile customer, holds a whole /64 and picks its addresses
    in it at will: per address, it would have 2**64 budgets)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def enforce_address_limit(request: ASGIConnection[Any, Any, Any, Any]) -> None:
    """Session creation per client address, before the app's own bucket is touched.

    The app key is public (it ships in the app), so without this one address could
    spend the whole app's budget. Behind a proxy, uvicorn takes the address from
    X-Forwarded-For when the proxy is trusted (its FORWARDED_ALLOW_IPS).
    """
    state = app_state(request)
    per_minute = state.settings.sessions_per_ip_per_minute
    client = request.client
    if per_minute <= 0 or client is None:
        return
    wait = state.limiter.hit(f"ip:{address_key(client.host)}", per_minute)
    if wait is not None:
        raise RateLimited(
            "too many new sessions from this address; retry after the given delay",
            retry_after=wait,
        )


DEPENDENCIES = {
    "db": Provide(provide_db),
}
# Controllers use both: the middleware authenticates, the dependency hands over the principal.
ADMIN = {"admin": Provide(provide_admin, sync_to_thread=False)}
AGENT = {"agent": Provide(provide_agent, sync_to_thread=False)}
CLIENT = {"client": Provide(provide_client, sync_to_thread=False)}
ADMIN_AUTH = [Authenticate(authenticate_admin)]
AGENT_AUTH = [Authenticate(authenticate_agent)]
CLIENT_AUTH = [Authenticate(authenticate_client)]
