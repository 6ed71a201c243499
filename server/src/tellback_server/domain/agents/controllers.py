"""Admin API for agents, and the agent's own identity endpoint."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, Response, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.domain.agents.schemas import (
    AgentCreate,
    AgentCreated,
    AgentMe,
    AgentOut,
    AgentUpdate,
    Teammate,
)
from tellback_server.domain.agents.services import AgentService, teammates
from tellback_server.http import examples
from tellback_server.http.deps import (
    ADMIN,
    ADMIN_AUTH,
    AGENT,
    AGENT_AUTH,
    AdminPrincipal,
    AgentPrincipal,
)
from tellback_server.http.idempotency import IdempotencyKeyHeader, idempotent
from tellback_server.http.openapi import example_body
from tellback_server.http.pagination import DEFAULT_LIMIT, Limit, Page


def provide_agents(db: NamedDependency[AsyncSession]) -> AgentService:
    return AgentService(db)


class AdminAgentsController(Controller):
    path = "/v1/admin/agents"
    tags = ["admin"]
    security = [{"adminToken": []}]
    dependencies = {**ADMIN, "agents": Provide(provide_agents, sync_to_thread=False)}
    middleware = ADMIN_AUTH

    @post("/", status_code=201, response_model=AgentCreated, summary="Create an agent")
    async def create_agent(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[AsyncSession],
        admin: NamedDependency[AdminPrincipal],
        agents: NamedDependency[AgentService],
        data: Annotated[AgentCreate, example_body("An agent for one app", examples.AGENT_CREATE)],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[bytes]:
        """Returns the agent's `token`, shown only here."""
        return await idempotent(
            idempotency_key, request, db, admin.scope, 201, lambda _: agents.create(data)
        )

    @get("/", summary="List agents")
    async def list_agents(
        self,
        admin: NamedDependency[AdminPrincipal],
        agents: NamedDependency[AgentService],
        cursor: FromQuery[str | None] = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> Page[AgentOut]:
        return await agents.list(cursor, limit)

    @get("/{agent_id:uuid}", summary="Get an agent")
    async def get_agent(
        self,
        admin: NamedDependency[AdminPrincipal],
        agents: NamedDependency[AgentService],
        agent_id: FromPath[UUID],
    ) -> AgentOut:
        return await agents.get(agent_id)

    @patch("/{agent_id:uuid}", summary="Rename, disable, or change an agent's apps")
    async def update_agent(
        self,
        admin: NamedDependency[AdminPrincipal],
        agents: NamedDependency[AgentService],
        agent_id: FromPath[UUID],
        data: JSONBody[AgentUpdate],
    ) -> AgentOut:
        return await agents.update(agent_id, data)

    @post("/{agent_id:uuid}/rotate-token", status_code=200, summary="Issue a new agent token")
    async def rotate_token(
        self,
        admin: NamedDependency[AdminPrincipal],
        agents: NamedDependency[AgentService],
        agent_id: FromPath[UUID],
    ) -> AgentCreated:
        """The old token stops working at once."""
        return await agents.rotate_token(agent_id)


class AgentMeController(Controller):
    path = "/v1/agent"
    tags = ["agent"]
    security = [{"agentToken": []}]
    dependencies = AGENT
    middleware = AGENT_AUTH

    @get("/me", summary="The calling agent")
    async def me(self, agent: NamedDependency[AgentPrincipal]) -> AgentMe:
        return AgentMe(id=agent.agent_id, name=agent.name, app_ids=sorted(agent.app_ids))

    @get("/apps/{app_id:uuid}/agents", summary="The active agents of one of your apps")
    async def app_agents(
        self,
        agent: NamedDependency[AgentPrincipal],
        db: NamedDependency[AsyncSession],
        app_id: FromPath[UUID],
    ) -> list[Teammate]:
        """Whom a conversation of this app can be assigned to (`PATCH … assignee_id`)."""
        return await teammates(db, agent, app_id)
