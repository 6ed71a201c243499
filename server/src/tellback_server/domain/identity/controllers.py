"""Client API: sessions, the end user, the SDK's configuration."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, patch, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.handlers.base import BaseRouteHandler
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.domain.identity.schemas import (
    ClientConfig,
    EndUserOut,
    MeUpdate,
    SessionCreate,
    SessionCreated,
)
from tellback_server.domain.identity.services import IdentityService
from tellback_server.http import examples
from tellback_server.http.deps import (
    CLIENT,
    CLIENT_AUTH,
    ClientPrincipal,
    app_state,
    enforce_address_limit,
    enforce_rate_limits,
)
from tellback_server.http.openapi import example_body


def provide_identity(
    request: Request[Any, Any, Any], db: NamedDependency[AsyncSession]
) -> IdentityService:
    state = app_state(request)
    return IdentityService(db, state.sealer, state.settings.session_ttl_seconds)


def address_limit(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    enforce_address_limit(connection)


class SessionsController(Controller):
    path = "/v1/client/sessions"
    tags = ["client"]
    dependencies = {"identity": Provide(provide_identity, sync_to_thread=False)}

    # The limit per client address is a guard: checked before the body is read.
    @post(
        "/",
        status_code=201,
        summary="Start a session (anonymous or identified)",
        guards=[address_limit],
    )
    async def create_session(
        self,
        request: Request[Any, Any, Any],
        identity: NamedDependency[IdentityService],
        data: Annotated[
            SessionCreate,
            example_body("An anonymous session for this installation", examples.SESSION_CREATE),
        ],
    ) -> SessionCreated:
        """Creates or resumes the installation's end user. With `user_token`, the
        anonymous user of this installation is merged into the identified one."""
        app = await identity.find_app(data.app_key)
        enforce_rate_limits(request, app.id, app.settings or {}, None)
        return await identity.create_session(app, data)


class MeController(Controller):
    path = "/v1/client"
    tags = ["client"]
    security = [{"sessionToken": []}]
    dependencies = {**CLIENT, "identity": Provide(provide_identity, sync_to_thread=False)}
    middleware = CLIENT_AUTH

    @get("/me", summary="The current end user")
    async def get_me(
        self, client: NamedDependency[ClientPrincipal], identity: NamedDependency[IdentityService]
    ) -> EndUserOut:
        return await identity.me(client)

    @patch("/me", summary="Update name, email or attributes")
    async def update_me(
        self,
        client: NamedDependency[ClientPrincipal],
        identity: NamedDependency[IdentityService],
        data: Annotated[MeUpdate, example_body("Name and one attribute", examples.ME_UPDATE)],
    ) -> EndUserOut:
        """`attributes` are merged; a key set to null is removed. An identified user's
        `external_id` comes only from the signed token and cannot be changed here."""
        return await identity.update_me(client, data)

    @get("/config", summary="What the SDK must know before submitting")
    async def get_config(
        self, client: NamedDependency[ClientPrincipal], identity: NamedDependency[IdentityService]
    ) -> ClientConfig:
        return await identity.config(client)
