"""The issue's "naive prototype" for bench_ingest: ORM inserts and nothing else.

Issue 8 sets the ingest goals next to a reference figure: a prototype that "only
inserts conversation + message + job through the ORM, with no auth or
idempotency" measured 0.175 of the ceiling on PostgreSQL and 0.078 on SQLite on
this machine class. This is that prototype, so the reference can be measured in
the same run, with the same load generator and ceiling, as Tellback itself:
``POST /naive/conversations`` decodes the same body, opens an ``AsyncSession``
on SQLAlchemy's standard async driver for the database (aiosqlite, asyncpg),
adds a conversation, its message and a job, commits, and answers the same
shape. No session check, no validation beyond the types, no idempotency, no
events. The job is due in a day, so no worker picks it up during the run.

Run with the ``TELLBACK_*`` environment of a migrated database with at least
one end user (the rows are written for the first one).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import msgspec
import uvicorn
from litestar import Litestar, Request, get, post
from litestar.params import JSONBody
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from uuid_utils.compat import uuid7

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tellback_server.cli import freeze_startup_heap, uvicorn_config
from tellback_server.db.models import Conversation, EndUser, Job, Message
from tellback_server.domain.conversations.schemas import ConversationCreate, ConversationOut
from tellback_server.settings import load_settings
from tests.bench.ceiling_app import _out


def build(database_url: str) -> Litestar:
    engine = create_async_engine(database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    owner: dict[str, Any] = {}

    async def find_owner() -> None:
        async with sessions() as db:
            user = (await db.execute(select(EndUser.id, EndUser.app_id).limit(1))).one()
        owner.update(end_user_id=user.id, app_id=user.app_id)

    @post("/naive/conversations", status_code=201)
    async def create(
        request: Request[Any, Any, Any], data: JSONBody[ConversationCreate]
    ) -> ConversationOut:
        now = dt.datetime.now(dt.UTC)
        conv_id, message_id = uuid7(), uuid7()
        location = msgspec.to_builtins(data.location) if data.location is not None else None
        async with sessions() as db, db.begin():
            db.add(
                Conversation(
                    id=conv_id,
                    **owner,
                    status="open",
                    priority="normal",
                    subject=data.subject,
                    category=data.category,
                    tags=data.tags,
                    custom_fields=data.custom_fields,
                    context=msgspec.to_builtins(data.context),
                    location=location,
                    last_message_id=message_id,
                    last_activity_at=now,
                    last_public_message_id=message_id,
                    public_activity_at=now,
                    message_count=1,
                    agent_unread_count=1,
                )
            )
            db.add(
                Message(
                    id=message_id,
                    conversation_id=conv_id,
                    app_id=owner["app_id"],
                    author_type="user",
                    author_user_id=owner["end_user_id"],
                    body=data.body,
                    location=location,
                )
            )
            db.add(
                Job(
                    kind="bench.naive",
                    payload={"message_id": str(message_id)},
                    run_after=now + dt.timedelta(days=1),
                )
            )
        return _out(data)

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def dispose() -> None:
        await engine.dispose()

    return Litestar(
        [create, healthz],
        on_startup=[find_owner],
        on_shutdown=[dispose],
        debug=False,
        logging_config=None,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = build(load_settings().database_url)
    freeze_startup_heap()
    uvicorn.Server(uvicorn_config(app, "127.0.0.1", args.port)).run()


if __name__ == "__main__":
    main()
