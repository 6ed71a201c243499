"""``Idempotency-Key`` handling for every create.

The request does its work first; the last statement of its transaction inserts
the key together with the answer (INSERT ... ON CONFLICT DO NOTHING). So the
effects and the stored answer commit together or not at all: a failed request
leaves no key behind and can be retried, and the key costs one statement. If the
key is already there, the request's own work is rolled back and the stored
answer replayed (:class:`~tellback_server.http.errors.Replay`): a concurrent
request with the same key waits on the row (PostgreSQL) or on the writer lock
(SQLite) until the first commits, then replays its response. (Sending feedback
on PostgreSQL is one statement with no transaction around it, key included:
every row it writes depends on the key's INSERT, so a taken key writes nothing,
and the request then goes the transaction's way described here.)
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from litestar import Request, Response
from litestar.params import HeaderParameter
from sqlalchemy import bindparam, delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from uuid_utils.compat import uuid7

from tellback_server.db.engine import SessionTx, Tx
from tellback_server.db.keys import KEYS, claim
from tellback_server.db.models import IdempotencyKey
from tellback_server.http.deps import app_state
from tellback_server.http.errors import (
    AppError,
    BadRequest,
    IdempotencyKeyInProgress,
    IdempotencyKeyReused,
    Replay,
)
from tellback_server.security import Sealer

REPLAYED = "Idempotent-Replayed"
_encoder = msgspec.json.Encoder()


def json_response(obj: Any, status: int) -> Response[bytes]:
    return Response(content=_encoder.encode(obj), status_code=status, media_type="application/json")


def _valid_key(key: str) -> bool:
    # Printable ASCII: 0x20-0x7E (for ASCII text, isprintable() is exactly that range).
    return 1 <= len(key) <= 255 and key.isascii() and key.isprintable()


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


class Answer:
    """The key of an idempotent create and, once produced, the answer stored under it.

    A producer may write the key itself in its own last statement, saving a round
    trip on PostgreSQL (``db/keys.py``, ``with_answer``): it calls :meth:`produced`
    with its result, passes :attr:`key_row` to that statement and sets
    :attr:`claimed` to whether the key's INSERT took. Otherwise :func:`idempotent`
    writes the key after the producer returns.
    """

    __slots__ = (
        "_row",
        "_sealer",
        "claimed",
        "digest",
        "expires",
        "key",
        "now",
        "response",
        "scope",
        "status",
    )

    def __init__(
        self,
        sealer: Sealer,
        scope: str,
        key: str,
        digest: str,
        status: int,
        now: dt.datetime,
        ttl_seconds: int,
    ) -> None:
        self._sealer = sealer
        self.scope, self.key, self.digest, self.status, self.now = scope, key, digest, status, now
        self.expires = now + dt.timedelta(seconds=ttl_seconds)
        self._row: dict[str, Any] | None = None
        self.response: Response[bytes] | None = None
        self.claimed: bool | None = None  # None: the key is not written yet

    @property
    def key_row(self) -> dict[str, Any]:
        """The key's row, once :meth:`produced` was called."""
        assert self._row is not None
        return self._row

    def produced(self, result: Any) -> dict[str, Any]:
        """The key's row, with ``result`` as its stored answer (sealed: answers may carry
        secrets shown once, such as tokens and identity secrets). Made once."""
        if self._row is None:
            self.response = json_response(result, self.status)
            sealed = self._sealer.seal(
                self.response.content, idempotency_purpose(self.scope, self.key)
            )
            self._row = {
                "id": uuid7(),
                "scope": self.scope,
                "key": self.key,
                "request_hash": self.digest,
                "response_status": self.status,
                "response_body": sealed,
                "expires_at": self.expires,
                "created_at": self.now,
                "updated_at": self.now,
            }
        return self._row


async def idempotent(
    key: str | None,
    request: Request[Any, Any, Any],
    db: AsyncSession | Tx,
    scope: str,
    status: int,
    produce: Callable[[Answer | None], Awaitable[Any]],
    ttl_seconds: int = 24 * 3600,
) -> Response[bytes]:
    """Run ``produce`` in ``db``'s transaction and store its answer under ``key``; or,
    when the key holds an answer already, raise :class:`Replay` of it (which rolls
    the transaction back)."""
    if key is None:
        return json_response(await produce(None), status)
    if not _valid_key(key):
        raise BadRequest("Idempotency-Key must be 1-255 printable ASCII characters")
    tx = SessionTx(db) if isinstance(db, AsyncSession) else db
    body = await request.body()
    # The path as ``request.url.path`` gives it, without building the whole URL.
    path = request.scope.get("root_path", "") + request.scope["path"]
    digest = hashlib.sha256(f"{request.method} {path}\n".encode() + body).hexdigest()
    now = dt.datetime.now(dt.UTC)
    sealer = app_state(request).sealer
    answer = Answer(sealer, scope, key, digest, status, now, ttl_seconds)
    try:
        result = await produce(answer)
    except AppError as exc:
        if exc.status_code >= 500:
            raise
        # A retry of a request that succeeded can fail the request's own checks (its
        # attachments are on the message it made): the stored answer comes first. Read
        # in this transaction (no second connection; on SQLite it also sees a key an
        # earlier member of the write group wrote), unless it can no longer read.
        try:
            stored = await tx.run(_existing, scope, key, now)
        except (SQLAlchemyError, AppError):  # (a failed statement took the transaction)
            raise exc from None
        if stored is None:
            raise
        raise _replay_or_refusal(stored, digest, sealer, scope, key) from None
    for _ in range(2):
        if answer.claimed is None:
            answer.claimed = await tx.run(claim, answer.produced(result))
        if answer.claimed:
            assert answer.response is not None
            return answer.response
        # The key was taken: by a request that committed first, or (SQLite) by an
        # earlier member of this write group, whose rows this transaction sees.
        existing = await tx.run(_existing, scope, key, now)
        if existing is None:
            answer.claimed = None  # it had expired and is dropped now: take it
            continue
        raise _replay_or_refusal(existing, digest, sealer, scope, key)
    raise IdempotencyKeyInProgress("a request with this Idempotency-Key is still running")


def _replay_or_refusal(
    existing: Any, digest: str, sealer: Sealer, scope: str, key: str
) -> Exception:
    """What a request meets whose key already holds ``existing``: the stored answer
    (:class:`Replay`), or the error that says why not."""
    if existing.request_hash != digest:
        return IdempotencyKeyReused("this Idempotency-Key was used with a different request body")
    if existing.response_status is None or existing.response_body is None:
        # Not written by this version, which stores key and answer together.
        return IdempotencyKeyInProgress("a request with this Idempotency-Key is still running")
    return Replay(
        Response(
            content=sealer.open(existing.response_body, idempotency_purpose(scope, key)),
            status_code=existing.response_status,
            media_type="application/json",
            headers={REPLAYED: "true"},
        )
    )


# Core statements on the table, built once (the ORM adds nothing to these).
_T = KEYS
_WHERE = (_T.c.scope == bindparam("s"), _T.c.key == bindparam("k"))
_EXISTING = select(
    _T.c.request_hash, _T.c.response_status, _T.c.response_body, _T.c.expires_at
).where(*_WHERE)
_DELETE = delete(_T).where(*_WHERE)


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
