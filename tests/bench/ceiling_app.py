"""The framework ceiling for bench_ingest: Litestar doing only what it must.

It decodes the same request types as Tellback (msgspec Structs, same
validation), reads the same bearer header, and answers the same response
shapes, without authentication lookups, a database or idempotency. Served by
uvicorn with the settings `tellback serve` uses.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import uuid
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from litestar import Litestar, Request, get, post
from litestar.params import JSONBody

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tellback_server.cli import freeze_startup_heap
from tellback_server.domain.conversations.schemas import (
    AgentConversation,
    AgentMessageOut,
    Author,
    ConversationCreate,
    ConversationOut,
    MessageOut,
)
from tellback_server.domain.identity.schemas import EndUserOut
from tellback_server.http.pagination import Page

M = TypeVar("M", bound=MessageOut)


def _message(kind: type[M], conv_id: uuid.UUID, user_id: uuid.UUID, data: ConversationCreate) -> M:
    """``data``'s body as the end user's message, of the client's or an agent's shape."""
    return kind(
        id=uuid.uuid4(),
        conversation_id=conv_id,
        author=Author(type="user", id=user_id, name=None),
        body=data.body,
        attachments=[],
        location=data.location,
        created_at=dt.datetime.now(dt.UTC),
    )


def _out(data: ConversationCreate) -> ConversationOut:
    now = dt.datetime.now(dt.UTC)
    conv_id = uuid.uuid4()
    message = _message(MessageOut, conv_id, uuid.uuid4(), data)
    return ConversationOut(
        id=conv_id,
        status="open",
        subject=data.subject,
        category=data.category,
        tags=data.tags,
        custom_fields=data.custom_fields,
        location=data.location,
        created_at=now,
        updated_at=now,
        last_message=message,
        unread_count=0,
    )


@post("/ceiling/conversations", status_code=201)
async def create(
    request: Request[Any, Any, Any], data: JSONBody[ConversationCreate]
) -> ConversationOut:
    _ = request.headers.get("authorization"), request.headers.get("idempotency-key")
    return _out(data)


_SAMPLE = ConversationCreate(body="The checkout button does nothing. " * 4, subject="Checkout")


@get("/ceiling/conversations")
async def list_(request: Request[Any, Any, Any], limit: int = 25) -> Page[ConversationOut]:
    _ = request.headers.get("authorization")
    return Page(items=[_out(_SAMPLE) for _ in range(limit)], next_cursor="x" * 40)


def _agent_out(data: ConversationCreate) -> AgentConversation:
    """``data`` as it shows in an agent's inbox: the end user and the last message."""
    now = dt.datetime.now(dt.UTC)
    conv_id, user_id = uuid.uuid4(), uuid.uuid4()
    message = _message(AgentMessageOut, conv_id, user_id, data)
    return AgentConversation(
        id=conv_id,
        app_id=uuid.uuid4(),
        status="open",
        priority="normal",
        subject=data.subject,
        category=data.category,
        tags=data.tags,
        assignee_id=None,
        end_user=EndUserOut(id=user_id, external_id=None, name=None, email=None, attributes={}),
        last_message=message,
        message_count=1,
        unread_count=1,
        created_at=now,
        updated_at=now,
        last_activity_at=now,
    )


@get("/ceiling/agent/conversations")
async def agent_list(request: Request[Any, Any, Any], limit: int = 25) -> Page[AgentConversation]:
    _ = request.headers.get("authorization")
    return Page(items=[_agent_out(_SAMPLE) for _ in range(limit)], next_cursor="x" * 40)


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = Litestar([create, list_, agent_list, healthz], debug=False, logging_config=None)
    freeze_startup_heap()  # the garbage collector's settings `tellback serve` uses
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
