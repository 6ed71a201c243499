"""Wire types for agents (managed by admins)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated
from uuid import UUID

from msgspec import UNSET, Meta, Struct, UnsetType

from tellback_server.domain.identity.schemas import Email

AgentName = Annotated[str, Meta(min_length=1, max_length=200)]
AppIds = Annotated[list[UUID], Meta(max_length=1000)]


class AgentCreate(Struct, forbid_unknown_fields=True):
    name: AgentName
    email: Email | None = None
    app_ids: AppIds = []


class AgentUpdate(Struct, forbid_unknown_fields=True):
    name: AgentName | UnsetType = UNSET
    email: Email | UnsetType | None = UNSET
    app_ids: AppIds | UnsetType = UNSET
    disabled: bool | UnsetType = UNSET


class AgentOut(Struct):
    id: UUID
    name: str
    email: str | None
    app_ids: list[UUID]
    disabled: bool
    created_at: dt.datetime
    updated_at: dt.datetime


class AgentCreated(AgentOut):
    """Returned at creation and on token rotation: ``token`` is never shown again."""

    token: str = ""


class AgentMe(Struct):
    id: UUID
    name: str
    app_ids: list[UUID]


class Teammate(Struct):
    """An active agent of an app, as other agents of that app see them (for assigning)."""

    id: UUID
    name: str
