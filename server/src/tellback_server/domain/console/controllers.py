"""``/console``: the agent console, server-rendered over the agent service layer.

Every page resolves the agent exactly as the agent API does (the token hash in
the sealed session cookie, looked up by ``agent_by_token_hash``) and reads and
writes only through ``ConversationService``'s ``agent_*`` methods, so scoping,
validation, events, pushes and webhooks are the API's own. Every POST checks
the CSRF token (see ``session.py``) and refuses cross-site fetch metadata.
"""

from __future__ import annotations

from importlib import resources
from typing import Any
from uuid import UUID

import msgspec
import structlog
from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.di import NamedDependency, Provide
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath
from litestar.response import Template

from tellback_server.domain.console import session as cs
from tellback_server.domain.console.inbox import (
    app_labels,
    conversation_context,
    inbox_page,
    update_from_form,
)
from tellback_server.domain.console.pages import (
    ERROR_HANDLERS,
    LOGIN_PATH,
    is_secure,
    redirect,
    render,
    safe_next,
    secret_key,
    security_headers,
    session_cookie,
)
from tellback_server.domain.console.views import InboxFilters
from tellback_server.domain.conversations.controllers import provide_conversations
from tellback_server.domain.conversations.schemas import AgentMessageCreate
from tellback_server.domain.conversations.services import ConversationService
from tellback_server.http.deps import (
    AGENT,
    PRINCIPAL,
    AgentPrincipal,
    agent_by_token_hash,
    app_state,
)
from tellback_server.http.errors import (
    AppError,
    Forbidden,
    NotFound,
    RateLimited,
    Unauthenticated,
    ValidationFailed,
)
from tellback_server.security import AGENT_TOKEN_PREFIX, hash_token

_SERVICE = {"conversations": Provide(provide_conversations, sync_to_thread=False)}
_STATIC = {
    "console.js": "text/javascript",
    "console.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
_STATIC_CACHE: dict[str, bytes] = {}
_log = structlog.get_logger("tellback.console")
_SESSION = "console_session"  # the request state's key for the opened session
# Per client address (a burst of 10 s worth, then one every 2 s): plenty for people
# behind one office address, and far too slow to guess a token.
SIGN_INS_PER_MINUTE = 30


async def console_guard(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    state = app_state(connection)
    value = connection.cookies.get(session_cookie(connection))
    opened = await cs.signed_in(state.db, state.sealer, value) if value else None
    principal = await agent_by_token_hash(state, opened.token_hash) if opened else None
    if principal is None:
        raise Unauthenticated("sign in to use the console")
    structlog.contextvars.bind_contextvars(agent_id=str(principal.agent_id))
    connection.scope["state"][PRINCIPAL] = principal  # read by the AGENT dependency
    connection.scope["state"][_SESSION] = opened  # read by logout


def _refuse_cross_site(request: Request[Any, Any, Any]) -> None:
    # Browsers that send fetch metadata tell us where a POST came from; only our own pages
    # (same-origin) may post. SameSite=Strict and the CSRF token cover the others.
    if request.headers.get("sec-fetch-site") in {"cross-site", "same-site"}:
        raise Forbidden("cross-site requests to the console are refused")


async def checked_form(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The posted form, after the CSRF check that every console POST makes."""
    _refuse_cross_site(request)
    form = await request.form()
    given = form.get(cs.CSRF_FIELD) or request.headers.get(cs.CSRF_HEADER)
    bound = request.cookies.get(session_cookie(request))
    if not cs.csrf_matches(secret_key(request), bound, given if isinstance(given, str) else None):
        raise Forbidden("this form has expired or did not come from the console; reload the page")
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _address(request: Request[Any, Any, Any]) -> str | None:
    return request.client.host if request.client else None


def _limit_sign_in(request: Request[Any, Any, Any]) -> None:
    """Sign-in attempts per client address, each counted before the token is looked up:
    guessing tokens (or making the server look them up) is slow from any one address.
    On PostgreSQL the processes share the count, as every rate limit (``ratelimit.py``)."""
    address = _address(request)
    if address is None:
        return
    wait = app_state(request).limiter.hit(f"console-login:{address}", SIGN_INS_PER_MINUTE)
    if wait is not None:
        _log.warning("console.sign_in_failed", reason="rate_limited", address=address)
        raise RateLimited(
            f"Too many sign-in attempts from this address; try again in {wait} s.",
            retry_after=wait,
        )


def _cookie(
    request: Request[Any, Any, Any], key: str, value: str, max_age: int, path: str = "/console"
) -> Cookie:
    return Cookie(
        key=key,
        value=value,
        path=path,
        max_age=max_age,
        httponly=True,
        secure=is_secure(request),
        samesite="strict",
    )


class ConsoleAuthController(Controller):
    """Sign-in and static files: the only console routes without a session."""

    path = "/console"
    include_in_schema = False
    exception_handlers = ERROR_HANDLERS  # type: ignore[assignment]

    @get("/login")
    async def login_form(self, request: Request[Any, Any, Any]) -> Template:
        return self._login_page(request, error=None, status=200)

    def _login_page(
        self, request: Request[Any, Any, Any], error: str | None, status: int
    ) -> Template:
        nonce = cs.new_login_nonce()
        next_path = safe_next(request.query_params.get("next"))
        # A link followed from another site (chat, email) arrives without the SameSite=Strict
        # cookie even when signed in: the page retries once from here, same-origin.
        cross_site = request.headers.get("sec-fetch-site") == "cross-site"
        response = render(
            request,
            "login.html",
            status=status,
            error=error,
            next_path=next_path or "",
            retry=next_path if cross_site and error is None and next_path else "",
            login_csrf=cs.csrf_token(secret_key(request), f"login:{nonce}"),
        )
        response.cookies.append(_cookie(request, cs.LOGIN_COOKIE, nonce, cs.LOGIN_TTL_S))
        return response

    @post("/login", status_code=303)
    async def login(self, request: Request[Any, Any, Any]) -> Response[Any]:
        _refuse_cross_site(request)
        _limit_sign_in(request)
        form = await request.form()
        nonce = request.cookies.get(cs.LOGIN_COOKIE)
        given = form.get(cs.CSRF_FIELD)
        bound = f"login:{nonce}" if nonce else None
        if not cs.csrf_matches(
            secret_key(request), bound, given if isinstance(given, str) else None
        ):
            raise Forbidden("the sign-in form has expired; reload the page and try again")
        token = form.get("token")
        token = token.strip() if isinstance(token, str) else ""
        principal = None
        if token.startswith(AGENT_TOKEN_PREFIX) and len(token) <= 200:
            principal = await agent_by_token_hash(app_state(request), hash_token(token))
        if principal is None:
            _log.warning(
                "console.sign_in_failed", reason="token_not_valid", address=_address(request)
            )
            return self._login_page(request, error="That agent token is not valid.", status=401)
        _log.info("console.signed_in", agent_id=str(principal.agent_id))
        sealed = cs.seal_session(app_state(request).sealer, hash_token(token))
        next_path = form.get("next")
        response = redirect(
            request, safe_next(next_path if isinstance(next_path, str) else None) or "/console/"
        )
        name = session_cookie(request)  # (path /: the agent event stream reads it too)
        response.cookies.append(_cookie(request, name, sealed, cs.SESSION_TTL_S, path="/"))
        response.cookies.append(_cookie(request, cs.LOGIN_COOKIE, "", 0))
        return response

    @get("/static/{name:str}")
    async def static(self, request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
        media_type = _STATIC.get(name)
        if media_type is None:
            raise NotFound("no such file")
        if name not in _STATIC_CACHE:
            files = resources.files("tellback_server.domain.console") / "static" / name
            _STATIC_CACHE[name] = files.read_bytes()
        headers = {**security_headers(app_state(request).settings), "Cache-Control": "no-cache"}
        return Response(_STATIC_CACHE[name], media_type=media_type, headers=headers)


class ConsoleController(Controller):
    path = "/console"
    include_in_schema = False
    guards = [console_guard]
    dependencies = {**AGENT, **_SERVICE}
    exception_handlers = ERROR_HANDLERS  # type: ignore[assignment]

    @get("/")
    async def inbox(
        self,
        request: Request[Any, Any, Any],
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
    ) -> Template:
        return await self._inbox(request, agent, conversations, "inbox.html")

    @get("/inbox/rows")
    async def inbox_rows(
        self,
        request: Request[Any, Any, Any],
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
    ) -> Template:
        """The inbox table alone, fetched by the page when an event arrives."""
        return await self._inbox(request, agent, conversations, "_inbox_rows.html")

    async def _inbox(
        self,
        request: Request[Any, Any, Any],
        agent: AgentPrincipal,
        conversations: ConversationService,
        template: str,
    ) -> Template:
        filters = InboxFilters.parse(dict(request.query_params.items()))
        items, next_cursor = await inbox_page(conversations, agent, filters)
        labels = await app_labels(conversations.db, agent)
        return render(
            request,
            template,
            filters=filters,
            items=items,
            apps=sorted(((str(a), label) for a, label in labels.items()), key=lambda a: a[1]),
            app_labels=labels,
            next_query=filters.query(cursor=next_cursor) if next_cursor else None,
            rows_query=filters.query(cursor=filters.cursor),
        )

    @get("/c/{conversation_id:uuid}")
    async def conversation(
        self,
        request: Request[Any, Any, Any],
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
    ) -> Template:
        context = await conversation_context(conversations, agent, conversation_id)
        return render(request, "conversation.html", error=None, draft="", **context)

    @get("/c/{conversation_id:uuid}/live")
    async def conversation_live(
        self,
        request: Request[Any, Any, Any],
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
    ) -> Template:
        """The thread alone, fetched by the page when an event about it arrives."""
        context = await conversation_context(conversations, agent, conversation_id)
        return render(request, "_thread.html", **context)

    @post("/c/{conversation_id:uuid}/reply", status_code=303)
    async def reply(
        self,
        request: Request[Any, Any, Any],
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
    ) -> Response[Any]:
        form = await checked_form(request)
        body = form.get("body", "")
        try:
            data = msgspec.convert(
                {"body": body or None, "internal": form.get("internal") == "1"},
                AgentMessageCreate,
            )
            message = await conversations.agent_reply(agent, conversation_id, data)
        except (msgspec.ValidationError, ValidationFailed) as exc:
            return await self._with_error(request, agent, conversations, conversation_id, exc, body)
        return redirect(request, f"/console/c/{conversation_id}#m-{message.id}")

    @post("/c/{conversation_id:uuid}/update", status_code=303)
    async def update(
        self,
        request: Request[Any, Any, Any],
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
    ) -> Response[Any]:
        form = await checked_form(request)
        try:
            await conversations.agent_update(agent, conversation_id, update_from_form(form, agent))
        except (msgspec.ValidationError, ValidationFailed) as exc:
            return await self._with_error(request, agent, conversations, conversation_id, exc, "")
        return redirect(request, f"/console/c/{conversation_id}")

    async def _with_error(
        self,
        request: Request[Any, Any, Any],
        agent: AgentPrincipal,
        conversations: ConversationService,
        conversation_id: UUID,
        exc: Exception,
        draft: str,
    ) -> Template:
        context = await conversation_context(conversations, agent, conversation_id)
        error = exc.detail if isinstance(exc, AppError) and exc.detail else str(exc)
        return render(request, "conversation.html", status=422, error=error, draft=draft, **context)

    @post("/c/{conversation_id:uuid}/read", status_code=204)
    async def mark_read(
        self,
        request: Request[Any, Any, Any],
        agent: NamedDependency[AgentPrincipal],
        conversations: NamedDependency[ConversationService],
        conversation_id: FromPath[UUID],
    ) -> None:
        await checked_form(request)
        await conversations.agent_read(agent, conversation_id)

    @post("/logout", status_code=303)
    async def logout(self, request: Request[Any, Any, Any]) -> Response[Any]:
        await checked_form(request)
        # Ended in the database, not only in this browser: a copy of the cookie dies too.
        await cs.sign_out(app_state(request).db, request.scope["state"][_SESSION])
        response = redirect(request, LOGIN_PATH)
        response.cookies.append(_cookie(request, session_cookie(request), "", 0, path="/"))
        return response
