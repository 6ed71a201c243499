"""Resource base classes: a resource only builds requests and decodes answers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tellback_sdk._async_client import AsyncClientBase
    from tellback_sdk._client import SyncClientBase
    from tellback_sdk._core import ClientCore


class SyncAPIResource:
    def __init__(self, client: SyncClientBase) -> None:
        self._client = client

    @property
    def _core(self) -> ClientCore:
        return self._client._core


class AsyncAPIResource:
    def __init__(self, client: AsyncClientBase) -> None:
        self._client = client

    @property
    def _core(self) -> ClientCore:
        return self._client._core
