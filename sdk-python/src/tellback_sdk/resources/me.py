"""The end user: profile (GET/PATCH /v1/client/me) and the unread badge count."""

from __future__ import annotations

from typing import Any

import msgspec

from tellback_sdk._core import RequestSpec, decode, encode
from tellback_sdk.resources._base import AsyncAPIResource, SyncAPIResource
from tellback_sdk.types import Unread, User

_GET = RequestSpec("GET", "/v1/client/me")
_UNREAD = RequestSpec("GET", "/v1/client/unread")
UNSET: Any = msgspec.UNSET


def _update_spec(name: Any, email: Any, attributes: dict[str, Any] | None) -> RequestSpec:
    body: dict[str, Any] = {}
    if name is not msgspec.UNSET:
        body["name"] = name
    if email is not msgspec.UNSET:
        body["email"] = email
    if attributes is not None:
        body["attributes"] = attributes
    return RequestSpec("PATCH", "/v1/client/me", content=encode(body))


class Me(SyncAPIResource):
    def get(self) -> User:
        return decode(self._client._call(_GET), User)

    def update(
        self,
        *,
        name: str | None = UNSET,
        email: str | None = UNSET,
        attributes: dict[str, Any] | None = None,
    ) -> User:
        """Only the fields passed change; an attribute set to None is removed."""
        return decode(self._client._call(_update_spec(name, email, attributes)), User)

    def unread_count(self) -> int:
        return decode(self._client._call(_UNREAD), Unread).unread_count


class AsyncMe(AsyncAPIResource):
    async def get(self) -> User:
        return decode(await self._client._call(_GET), User)

    async def update(
        self,
        *,
        name: str | None = UNSET,
        email: str | None = UNSET,
        attributes: dict[str, Any] | None = None,
    ) -> User:
        return decode(await self._client._call(_update_spec(name, email, attributes)), User)

    async def unread_count(self) -> int:
        return decode(await self._client._call(_UNREAD), Unread).unread_count
