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
from sqlalchemy import TextClause, bindparam, delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from uuid_utils.compat import uuid7

from tellback_server.db.base import table_of
from tellback_server.db.engine import SessionTx, Tx
from tellback_server.db.models import IdempotencyKey
from tellback_server.db.prepared import Prepared
from tellback_server.http.deps import app_state
from tellback_server.http.errors import BadRequest, IdempotencyKeyInProgress, IdempotencyKeyReused

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
    db: AsyncSession | Tx,
    scope: str,
    status: int,
    produce: Callable[[], Awaitable[Any]],
    ttl_seconds: int = 24 * 3600,
) -> Response[bytes]:
    """Run ``produce`` once per key within ``db``'s transaction, or replay its answer."""
    if key is None:
        return json_response(await produce(), status)
    if not _valid_key(key):
        raise BadRequest("Idempotency-Key must be 1-255 printable ASCII characters")
    tx = SessionTx(db) if isinstance(db, AsyncSession) else db
    sealer = app_state(request).sealer
    body = await request.body()
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode() + body).hexdigest()
    now = dt.datetime.now(dt.UTC)
    expires = now + dt.timedelta(seconds=ttl_seconds)
    for _ in range(2):
        if await tx.run(_claim, scope, key, digest, now, expires):
            response = json_response(await produce(), status)
            # Responses may carry secrets shown once (tokens, identity secrets).
            sealed = sealer.seal(response.content, idempotency_purpose(scope, key))
            await tx.run(_store, scope, key, status, sealed, now)
            return response
        existing = await tx.run(_existing, scope, key, now)
        if existing is None:
            continue  # the other request rolled back, or the key expired (and was dropped)
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


# Core statements on the table, built once (the ORM adds nothing to these).
_T = table_of(IdempotencyKey)


def _claim_statement() -> TextClause:
    # Plain text, the same on SQLite and PostgreSQL: SQLAlchemy's dialect-specific
    # ON CONFLICT constructs cannot be cached, so they would compile on every request.
    cols = [c for c in _T.c if c.key in _CLAIM_COLUMNS]
    names = ", ".join(f'"{c.name}"' for c in cols)
    values = ", ".join(f":{c.key}" for c in cols)
    # Names from our own table; every value is a bound parameter.
    sql = f"INSERT INTO {_T.name} ({names}) VALUES ({values}) "  # noqa: S608
    sql += 'ON CONFLICT ("scope", "key") DO NOTHING RETURNING "id"'
    return text(sql).bindparams(*(bindparam(c.key, type_=c.type) for c in cols))


_CLAIM_COLUMNS = ("id", "scope", "key", "request_hash", "expires_at", "created_at", "updated_at")
_CLAIM = Prepared(_claim_statement())
_WHERE = (_T.c.scope == bindparam("s"), _T.c.key == bindparam("k"))
_STORE = Prepared(
    update(_T)
    .where(*_WHERE)
    .values(
        {
            k: bindparam(k, type_=_T.c[k].type)
            for k in ("response_status", "response_body", "updated_at")
        }
    )
)
_EXISTING = select(
    _T.c.request_hash, _T.c.response_status, _T.c.response_body, _T.c.expires_at
).where(*_WHERE)
_DELETE = delete(_T).where(*_WHERE)


def _claim(
    db: Session, scope: str, key: str, digest: str, now: dt.datetime, expires: dt.datetime
) -> bool:
    row = {
        "id": uuid7(),
        "scope": scope,
        "key": key,
        "request_hash": digest,
        "expires_at": expires,
        "created_at": now,
        "updated_at": now,
    }
    return bool(_CLAIM.execute(db, row))


def _store(db: Session, scope: str, key: str, status: int, sealed: bytes, now: dt.datetime) -> None:
    values = {"response_status": status, "response_body": sealed, "updated_at": now}
    _STORE.execute(db, {"s": scope, "k": key, **values})


def _existing(db: Session, scope: str, key: str, now: dt.datetime) -> Any:
    """The key's row, or None when there is none or it had expired (then it is dropped)."""
    row = db.execute(_EXISTING, {"s": scope, "k": key}).first()
    if row is not None and row.expires_at <= now:
        db.execute(_DELETE, {"s": scope, "k": key})
        return None
    return row


async def purge_expired(db: AsyncSession) -> int:
    result = await db.execute(
        delete(IdempotencyKey).where(IdempotencyKey.expires_at <= dt.datetime.now(dt.UTC))
    )
    return int(getattr(result, "rowcount", 0) or 0)
