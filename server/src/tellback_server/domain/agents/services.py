"""Agents: created by admins, each with a token shown once and a set of apps."""

from __future__ import annotations

import datetime as dt
from uuid import UUID

import msgspec
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.db.models import Agent, AgentApp, App
from tellback_server.domain.agents.schemas import (
    AgentCreate,
    AgentCreated,
    AgentOut,
    AgentUpdate,
    Teammate,
)
from tellback_server.http.auth_cache import auth_changed
from tellback_server.http.deps import AgentPrincipal
from tellback_server.http.errors import NotFound, ValidationFailed
from tellback_server.http.pagination import Page, keyset_page
from tellback_server.security import AGENT_TOKEN_PREFIX, hash_token, new_token


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AgentService:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def _app_ids(self, agent_id: UUID) -> list[UUID]:
        rows = await self.db.scalars(
            select(AgentApp.app_id).where(AgentApp.agent_id == agent_id).order_by(AgentApp.app_id)
        )
        return list(rows)

    async def _out(self, agent: Agent) -> AgentOut:
        return AgentOut(
            id=agent.id,
            name=agent.name,
            email=agent.email,
            app_ids=await self._app_ids(agent.id),
            disabled=agent.disabled_at is not None,
            created_at=agent.created_at,
            updated_at=agent.updated_at,
        )

    async def _get(self, agent_id: UUID) -> Agent:
        agent = await self.db.get(Agent, agent_id)
        if agent is None:
            raise NotFound("no such agent")
        return agent

    async def _set_apps(self, agent_id: UUID, app_ids: list[UUID]) -> None:
        wanted = set(app_ids)
        found = (
            set(await self.db.scalars(select(App.id).where(App.id.in_(wanted))))
            if wanted
            else set()
        )
        if missing := wanted - found:
            raise ValidationFailed.field(
                "app_ids", f"unknown app id {sorted(map(str, missing))[0]}"
            )
        await self.db.execute(delete(AgentApp).where(AgentApp.agent_id == agent_id))
        self.db.add_all(AgentApp(agent_id=agent_id, app_id=a) for a in sorted(wanted))
        await self.db.flush()

    async def create(self, data: AgentCreate) -> AgentCreated:
        token = new_token(AGENT_TOKEN_PREFIX)
        agent = Agent(name=data.name, email=data.email, token_hash=hash_token(token))
        self.db.add(agent)
        await self.db.flush()
        await self._set_apps(agent.id, data.app_ids)
        out = await self._out(agent)
        return AgentCreated(**msgspec.structs.asdict(out), token=token)

    async def list(self, cursor: str | None, limit: int) -> Page[AgentOut]:
        rows, nxt = await keyset_page(
            self.db, select(Agent), Agent.created_at, Agent.id, cursor, limit
        )
        return Page(items=[await self._out(a) for a in rows], next_cursor=nxt)

    async def get(self, agent_id: UUID) -> AgentOut:
        return await self._out(await self._get(agent_id))

    async def update(self, agent_id: UUID, data: AgentUpdate) -> AgentOut:
        agent = await self._get(agent_id)
        if data.name is not msgspec.UNSET:
            agent.name = data.name
        if data.email is not msgspec.UNSET:
            agent.email = data.email
        if data.disabled is not msgspec.UNSET:
            agent.disabled_at = (agent.disabled_at or _now()) if data.disabled else None
        if data.app_ids is not msgspec.UNSET:
            await self._set_apps(agent.id, data.app_ids)
        agent.updated_at = _now()
        await self.db.flush()
        auth_changed(self.db.sync_session)  # cached agents carry their name, apps, state
        return await self._out(agent)

    async def rotate_token(self, agent_id: UUID) -> AgentCreated:
        agent = await self._get(agent_id)
        token = new_token(AGENT_TOKEN_PREFIX)
        agent.token_hash = hash_token(token)
        agent.updated_at = _now()
        await self.db.flush()
        auth_changed(self.db.sync_session)  # the old token may be cached
        out = await self._out(agent)
        return AgentCreated(**msgspec.structs.asdict(out), token=token)


async def teammates(db: AsyncSession, agent: AgentPrincipal, app_id: UUID) -> list[Teammate]:
    """The active agents of one of the caller's apps (404 for any other app)."""
    if app_id not in agent.app_ids:
        raise NotFound("no such app")
    rows = await db.execute(
        select(Agent.id, Agent.name)
        .join(AgentApp, AgentApp.agent_id == Agent.id)
        .where(AgentApp.app_id == app_id, Agent.disabled_at.is_(None))
        .order_by(Agent.name, Agent.id)
    )
    return [Teammate(id=r.id, name=r.name) for r in rows]
