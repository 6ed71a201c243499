"""Admin API for agents, and the agent's own identity endpoint."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Controller, Request, Response, get, patch, post
from litestar.di import Provide
from litestar.params import Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.domain.agents.schemas import (
    AgentCreate,
    AgentCreated,
    AgentMe,
    AgentOut,
    AgentUpdate,
)
from tellback_server.domain.agents.services import AgentService
from tellback_server.http.deps import ADMIN, AGENT, AdminPrincipal, AgentPrincipal
from tellback_server.http.idempotency import idempotent
from tellback_server.http.pagination import DEFAULT_LIMIT, Page


def provide_agents(db: AsyncSession) -> AgentService:
    return AgentService(db)


class AdminAgentsController(Controller):
    path = "/v1/admin/agents"
    tags = ["admin"]
    dependencies = {**ADMIN, "agents": Provide(provide_agents, sync_to_thread=False)}

    @post("/", status_code=201, response_model=AgentCreated, summary="Create an agent")
    async def create_agent(
        self,
        request: Request[Any, Any, Any],
        db: AsyncSession,
        admin: AdminPrincipal,
        agents: AgentService,
        data: AgentCreate,
    ) -> Response[bytes]:
        """Returns the agent's `token`, shown only here."""
        return await idempotent(request, db, admin.scope, 201, lambda: agents.create(data))

    @get("/", summary="List agents")
    async def list_agents(
        self,
        admin: AdminPrincipal,
        agents: AgentService,
        cursor: str | None = None,
        limit: int = Parameter(default=DEFAULT_LIMIT, ge=1, le=100),
    ) -> Page[AgentOut]:
        return await agents.list(cursor, limit)

    @get("/{agent_id:uuid}", summary="Get an agent")
    async def get_agent(
        self, admin: AdminPrincipal, agents: AgentService, agent_id: UUID
    ) -> AgentOut:
        return await agents.get(agent_id)

    @patch("/{agent_id:uuid}", summary="Rename, disable, or change an agent's apps")
    async def update_agent(
        self, admin: AdminPrincipal, agents: AgentService, agent_id: UUID, data: AgentUpdate
    ) -> AgentOut:
        return await agents.update(agent_id, data)

    @post("/{agent_id:uuid}/rotate-token", status_code=200, summary="Issue a new agent token")
    async def rotate_token(
        self, admin: AdminPrincipal, agents: AgentService, agent_id: UUID
    ) -> AgentCreated:
        """The old token stops working at once."""
        return await agents.rotate_token(agent_id)


class AgentMeController(Controller):
    path = "/v1/agent"
    tags = ["agent"]
    dependencies = AGENT

    @get("/me", summary="The calling agent")
    async def me(self, agent: AgentPrincipal) -> AgentMe:
        return AgentMe(id=agent.agent_id, name=agent.name, app_ids=sorted(agent.app_ids))
