"""``Idempotency-Key`` handling for every create.

The key row is claimed with an INSERT ... ON CONFLICT DO NOTHING at the start
of the request's own transaction, and the response is stored in that same
transaction. So the effects and the stored response commit together or not at
all: a failed request leaves no key behind and can be retried. A concurrent
request with the same key blocks on the row (PostgreSQL) or on the writer lock
(SQLite) until the first commits, then replays its response.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from litestar import Request, Response
from litestar.params import HeaderParameter
from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from tellback_server.db.models import IdempotencyKey
from tellback_server.http.errors import BadRequest, IdempotencyKeyInProgress, IdempotencyKeyReused
from tellback_server.security import Sealer

REPLAYED = "Idempotent-Replayed"
_encoder = msgspec.json.Encoder()


def json_response(obj: Any, status: int) -> Response[bytes]:
    return Response(content=_encoder.encode(obj), status_code=status, media_type="application/json")


def _valid_key(key: str) -> bool:
    return 1 <= len(key) <= 255 and all(0x20 <= ord(c) <= 0x7E for c in key)


def idempotency_purpose(scope: str, key: str) -> str:
    return f"idempotency:{scope}:{key}"


# Declared on every create so the OpenAPI document (and generated clients) carry it;
# the value is checked below, with our own problem detail.
IdempotencyKeyHeader = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        description=(
            "1-255 printable ASCII characters, made once per operation and reused on its "
            "retries: within 24 h a repeat replays the first response"
        ),
    ),
]


async def idempotent(
    key: str | None,
    request: Request[Any, Any, Any],
    db: AsyncSession,
    scope: str,
    status: int,
    produce: Callable[[], Awaitable[Any]],
    ttl_seconds: int = 24 * 3600,
) -> Response[bytes]:
    if key is None:
        return json_response(await produce(), status)
    if not _valid_key(key):
        raise BadRequest("Idempotency-Key must be 1-255 printable ASCII characters")
    sealer: Sealer = request.app.state["tb"].sealer
    body = await request.body()
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode() + body).hexdigest()
    now = dt.datetime.now(dt.UTC)
    for _ in range(2):
        if await _claim(db, scope, key, digest, now, ttl_seconds):
            response = json_response(await produce(), status)
            await db.execute(
                update(IdempotencyKey)
                .where(IdempotencyKey.scope == scope, IdempotencyKey.key == key)
                .values(
                    response_status=status,
                    # Responses may carry secrets shown once (tokens, identity secrets).
                    response_body=sealer.seal(response.content, idempotency_purpose(scope, key)),
                    updated_at=now,
                )
            )
            return response
        existing = (
            await db.execute(
                select(
                    IdempotencyKey.request_hash,
                    IdempotencyKey.response_status,
                    IdempotencyKey.response_body,
                    IdempotencyKey.expires_at,
                ).where(IdempotencyKey.scope == scope, IdempotencyKey.key == key)
            )
        ).first()
        if existing is None:
            continue  # the other request rolled back between our insert and select
        if existing.expires_at <= now:
            await db.execute(
                delete(IdempotencyKey).where(
                    IdempotencyKey.scope == scope, IdempotencyKey.key == key
                )
            )
            continue
        if existing.request_hash != digest:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used with a different request body"
            )
        if existing.response_status is None or existing.response_body is None:
            raise IdempotencyKeyInProgress("a request with this Idempotency-Key is still running")
        return Response(
            content=sealer.open(existing.response_body, idempotency_purpose(scope, key)),
            status_code=existing.response_status,
            media_type="application/json",
            headers={REPLAYED: "true"},
        )
    raise IdempotencyKeyInProgress("a request with this Idempotency-Key is still running")


async def _claim(
    db: AsyncSession, scope: str, key: str, digest: str, now: dt.datetime, ttl: int
) -> bool:
    dialect = db.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(IdempotencyKey)
        .values(
            id=uuid7(),
            scope=scope,
            key=key,
            request_hash=digest,
            expires_at=now + dt.timedelta(seconds=ttl),
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["scope", "key"])
        .returning(IdempotencyKey.id)
    )
    return (await db.execute(stmt)).first() is not None


async def purge_expired(db: AsyncSession) -> int:
    result = await db.execute(
        delete(IdempotencyKey).where(IdempotencyKey.expires_at <= dt.datetime.now(dt.UTC))
    )
    return int(getattr(result, "rowcount", 0) or 0)
