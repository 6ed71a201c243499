"""Admin API: find and erase end users."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, delete, get
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.domain.identity.schemas import EndUserOut
from tellback_server.domain.users.services import EndUserService
from tellback_server.http.deps import ADMIN, ADMIN_AUTH, AdminPrincipal, app_state
from tellback_server.http.pagination import DEFAULT_LIMIT, Limit, Page


def provide_users(
    request: Request[Any, Any, Any], db: NamedDependency[AsyncSession]
) -> EndUserService:
    return EndUserService(db, app_state(request).store)


class AdminUsersController(Controller):
    path = "/v1/admin/apps/{app_id:uuid}/users"
    tags = ["admin"]
    security = [{"adminToken": []}]
    dependencies = {**ADMIN, "users": Provide(provide_users, sync_to_thread=False)}
    middleware = ADMIN_AUTH

    @get("/", summary="Find end users of an app")
    async def list_users(
        self,
        admin: NamedDependency[AdminPrincipal],
        users: NamedDependency[EndUserService],
        app_id: FromPath[UUID],
        external_id: Annotated[
            str | None, QueryParameter(description="the app's own user id (the token's `sub`)")
        ] = None,
        cursor: FromQuery[str | None] = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> Page[EndUserOut]:
        return await users.list(app_id, external_id, cursor, limit)

    @delete("/{user_id:uuid}", status_code=204, summary="Erase an end user and all their data")
    async def erase_user(
        self,
        admin: NamedDependency[AdminPrincipal],
        users: NamedDependency[EndUserService],
        app_id: FromPath[UUID],
        user_id: FromPath[UUID],
    ) -> None:
        """Deletes the user, their conversations, messages and attachments (the stored
        files are deleted by a background job queued in the same transaction)."""
        await users.erase(app_id, user_id)
