"""GET /v1/client/config, cached for a minute (limits checked before every upload)."""

from __future__ import annotations

from tellback_sdk._core import RequestSpec, decode
from tellback_sdk.resources._base import AsyncAPIResource, SyncAPIResource
from tellback_sdk.types import ClientConfig

_SPEC = RequestSpec("GET", "/v1/client/config")


class Config(SyncAPIResource):
    def get(self, *, refresh: bool = False) -> ClientConfig:
        cached = None if refresh else self._core.cached_config()
        if cached is not None:
            return cached
        return self._core.cache_config(decode(self._client._call(_SPEC), ClientConfig))


class AsyncConfig(AsyncAPIResource):
    async def get(self, *, refresh: bool = False) -> ClientConfig:
        cached = None if refresh else self._core.cached_config()
        if cached is not None:
            return cached
        return self._core.cache_config(decode(await self._client._call(_SPEC), ClientConfig))
