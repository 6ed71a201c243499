"""Device registration (end users and agents), push credentials and the delivery log."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from litestar import Controller, Request, delete, get, put
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.domain.push.schemas import (
    AgentDeviceRegister,
    ApnsCredentialsIn,
    DeviceOut,
    DeviceRegister,
    FcmCredentialsIn,
    PushDeliveryOut,
    PushStatus,
)
from tellback_server.domain.push.services import CredentialService, DeviceService
from tellback_server.http import examples
from tellback_server.http.deps import (
    ADMIN,
    ADMIN_AUTH,
    AGENT,
    AGENT_AUTH,
    CLIENT,
    CLIENT_AUTH,
    AdminPrincipal,
    AgentPrincipal,
    ClientPrincipal,
    app_state,
)
from tellback_server.http.openapi import example_body
from tellback_server.http.pagination import DEFAULT_LIMIT, Limit, Page


def provide_devices(db: NamedDependency[AsyncSession]) -> DeviceService:
    return DeviceService(db)


def provide_credentials(
    request: Request[Any, Any, Any], db: NamedDependency[AsyncSession]
) -> CredentialService:
    return CredentialService(db, app_state(request).sealer)


DEVICES = {"devices": Provide(provide_devices, sync_to_thread=False)}


class ClientDevicesController(Controller):
    path = "/v1/client/devices/current"
    tags = ["client"]
    security = [{"sessionToken": []}]
    dependencies = {**CLIENT, **DEVICES}
    middleware = CLIENT_AUTH

    @put("/", summary="Register this installation for push")
    async def register(
        self,
        client: NamedDependency[ClientPrincipal],
        devices: NamedDependency[DeviceService],
        data: Annotated[
            DeviceRegister, example_body("An iPhone's APNs token", examples.DEVICE_REGISTER)
        ],
    ) -> DeviceOut:
        """One device per installation (upsert). A token that moves to another
        installation is removed from the old one. After logout the device follows the
        installation's new (anonymous) user."""
        return await devices.register_client(client, data)

    @delete("/", status_code=204, summary="Stop push for this installation")
    async def unregister(
        self, client: NamedDependency[ClientPrincipal], devices: NamedDependency[DeviceService]
    ) -> None:
        await devices.remove_client(client)


class AgentDevicesController(Controller):
    path = "/v1/agent/devices/current"
    tags = ["agent"]
    security = [{"agentToken": []}]
    dependencies = {**AGENT, **DEVICES}
    middleware = AGENT_AUTH

    @put("/", summary="Register the agent's phone for push")
    async def register(
        self,
        agent: NamedDependency[AgentPrincipal],
        devices: NamedDependency[DeviceService],
        data: JSONBody[AgentDeviceRegister],
    ) -> DeviceOut:
        """The phone then gets a push for new feedback and user replies in all the
        agent's apps."""
        return await devices.register_agent(agent, data)

    @delete("/", status_code=204, summary="Stop push for one of the agent's phones")
    async def unregister(
        self,
        agent: NamedDependency[AgentPrincipal],
        devices: NamedDependency[DeviceService],
        installation_id: FromQuery[str] = "default",
    ) -> None:
        await devices.remove_agent(agent, installation_id)


class AdminPushController(Controller):
    path = "/v1/admin/apps/{app_id:uuid}"
    tags = ["admin"]
    security = [{"adminToken": []}]
    dependencies = {**ADMIN, "credentials": Provide(provide_credentials, sync_to_thread=False)}
    middleware = ADMIN_AUTH

    @get("/push", summary="Push configuration status (never the secrets)")
    async def status(
        self,
        admin: NamedDependency[AdminPrincipal],
        credentials: NamedDependency[CredentialService],
        app_id: FromPath[UUID],
    ) -> PushStatus:
        """Shows whether APNs/FCM are configured and the last credential error, e.g. a
        revoked key (`InvalidProviderToken`)."""
        return await credentials.status(app_id)

    @put("/push/apns", summary="Set APNs token-auth credentials")
    async def put_apns(
        self,
        admin: NamedDependency[AdminPrincipal],
        credentials: NamedDependency[CredentialService],
        app_id: FromPath[UUID],
        data: JSONBody[ApnsCredentialsIn],
    ) -> PushStatus:
        """`private_key` is the .p8 file's PEM text. Stored encrypted; never returned."""
        return await credentials.put_apns(app_id, data)

    @put("/push/fcm", summary="Set FCM service-account credentials")
    async def put_fcm(
        self,
        admin: NamedDependency[AdminPrincipal],
        credentials: NamedDependency[CredentialService],
        app_id: FromPath[UUID],
        data: JSONBody[FcmCredentialsIn],
    ) -> PushStatus:
        """`service_account` is the Firebase service-account JSON. Stored encrypted."""
        return await credentials.put_fcm(app_id, data)

    @delete("/push/apns", status_code=204, summary="Remove APNs credentials")
    async def remove_apns(
        self,
        admin: NamedDependency[AdminPrincipal],
        credentials: NamedDependency[CredentialService],
        app_id: FromPath[UUID],
    ) -> None:
        await credentials.remove(app_id, "apns")

    @delete("/push/fcm", status_code=204, summary="Remove FCM credentials")
    async def remove_fcm(
        self,
        admin: NamedDependency[AdminPrincipal],
        credentials: NamedDependency[CredentialService],
        app_id: FromPath[UUID],
    ) -> None:
        await credentials.remove(app_id, "fcm")

    @get("/push-deliveries", summary="The push delivery log, newest first")
    async def deliveries(
        self,
        admin: NamedDependency[AdminPrincipal],
        credentials: NamedDependency[CredentialService],
        app_id: FromPath[UUID],
        status: Annotated[
            Literal["sent", "retrying", "failed", "skipped", "invalid_token"] | None,
            QueryParameter(description="only deliveries in this state"),
        ] = None,
        cursor: FromQuery[str | None] = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> Page[PushDeliveryOut]:
        """One row per attempt: provider, status, reason, HTTP status, latency."""
        return await credentials.deliveries(app_id, status, cursor, limit)
