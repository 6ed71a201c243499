"""Push registration for this installation (sdk-spec/push.md)."""

from __future__ import annotations

from typing import Any

from tellback_sdk._core import RequestSpec, decode, encode
from tellback_sdk.resources._base import AsyncAPIResource, SyncAPIResource
from tellback_sdk.types import Device

_PATH = "/v1/client/devices/current"
_PLATFORM = {"apns": "ios", "fcm": "android"}


def _register_spec(
    provider: str,
    token: str,
    platform: str | None,
    apns_environment: str | None,
    app_version: str | None,
    locale: str | None,
) -> RequestSpec:
    body: dict[str, Any] = {
        "platform": platform or _PLATFORM.get(provider, "android"),
        "push_provider": provider,
        "push_token": token,
    }
    if provider == "apns" and apns_environment is not None:
        body["apns_environment"] = apns_environment
    if app_version is not None:
        body["app_version"] = app_version
    if locale is not None:
        body["locale"] = locale
    return RequestSpec("PUT", _PATH, content=encode(body))


class Devices(SyncAPIResource):
    def register(
        self,
        provider: str,
        token: str,
        *,
        platform: str | None = None,
        apns_environment: str | None = None,
        app_version: str | None = None,
        locale: str | None = None,
    ) -> Device:
        """Call on every app start and whenever the OS rotates the token. ``provider`` is
        ``apns`` or ``fcm``; ``platform`` defaults to ios for APNs, android for FCM."""
        spec = _register_spec(provider, token, platform, apns_environment, app_version, locale)
        return decode(self._client._call(spec), Device)

    def unregister(self) -> None:
        self._client._call(RequestSpec("DELETE", _PATH))


class AsyncDevices(AsyncAPIResource):
    async def register(
        self,
        provider: str,
        token: str,
        *,
        platform: str | None = None,
        apns_environment: str | None = None,
        app_version: str | None = None,
        locale: str | None = None,
    ) -> Device:
        spec = _register_spec(provider, token, platform, apns_environment, app_version, locale)
        return decode(await self._client._call(spec), Device)

    async def unregister(self) -> None:
        await self._client._call(RequestSpec("DELETE", _PATH))
