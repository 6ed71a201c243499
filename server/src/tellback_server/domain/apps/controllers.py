"""Admin API: apps, settings, key rotation."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.domain.apps.schemas import (
    AppCreate,
    AppCreated,
    AppOut,
    AppUpdate,
    KeysRotated,
    RotateKeys,
)
from tellback_server.domain.apps.services import AppService
from tellback_server.http import examples
from tellback_server.http.deps import ADMIN, ADMIN_AUTH, AdminPrincipal, app_state
from tellback_server.http.idempotency import IdempotencyKeyHeader, idempotent
from tellback_server.http.openapi import example_body
from tellback_server.http.pagination import DEFAULT_LIMIT, Limit, Page


def _service(request: Request[Any, Any, Any], db: NamedDependency[AsyncSession]) -> AppService:
    return AppService(db, app_state(request).sealer)


class AdminAppsController(Controller):
    path = "/v1/admin/apps"
    tags = ["admin"]
    dependencies = ADMIN
    middleware = ADMIN_AUTH
    security = [{"adminToken": []}]

    @post("/", status_code=201, response_model=AppCreated, summary="Create an app")
    async def create_app(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[AsyncSession],
        admin: NamedDependency[AdminPrincipal],
        data: Annotated[AppCreate, example_body("An iOS and Android app", examples.APP_CREATE)],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[bytes]:
        """Returns `app_key` and `identity_secret`; the secret is shown only here."""
        return await idempotent(
            idempotency_key,
            request,
            db,
            admin.scope,
            201,
            lambda _: _service(request, db).create(data),
        )

    @get("/", summary="List apps")
    async def list_apps(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[AsyncSession],
        admin: NamedDependency[AdminPrincipal],
        cursor: FromQuery[str | None] = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> Page[AppOut]:
        return await _service(request, db).list(cursor, limit)

    @get("/{app_id:uuid}", summary="Get an app and its settings")
    async def get_app(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[AsyncSession],
        admin: NamedDependency[AdminPrincipal],
        app_id: FromPath[UUID],
    ) -> AppOut:
        return await _service(request, db).get(app_id)

    @patch("/{app_id:uuid}", summary="Change an app's name or settings")
    async def update_app(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[AsyncSession],
        admin: NamedDependency[AdminPrincipal],
        app_id: FromPath[UUID],
        data: JSONBody[AppUpdate],
    ) -> AppOut:
        """Settings fields that are present replace the stored ones; absent ones stay."""
        return await _service(request, db).update(app_id, data)

    @post("/{app_id:uuid}/rotate-keys", status_code=200, summary="Rotate identity secret / app key")
    async def rotate_keys(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[AsyncSession],
        admin: NamedDependency[AdminPrincipal],
        app_id: FromPath[UUID],
        data: JSONBody[RotateKeys | None] = None,
    ) -> KeysRotated:
        """A new identity secret gets a new `kid`; older secrets stay valid until revoked,
        so app versions in the field keep working during the rollover."""
        return await _service(request, db).rotate_keys(app_id, data or RotateKeys())

    @delete(
        "/{app_id:uuid}/identity-secrets/{kid:str}",
        status_code=204,
        summary="Revoke one identity secret",
    )
    async def revoke_identity_secret(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[AsyncSession],
        admin: NamedDependency[AdminPrincipal],
        app_id: FromPath[UUID],
        kid: FromPath[str],
    ) -> None:
        await _service(request, db).revoke_identity_secret(app_id, kid)
