"""Keyset pagination: opaque cursors over (timestamp, id), stable under concurrent inserts."""

from __future__ import annotations

import binascii
import datetime as dt
from collections.abc import Sequence
from typing import Annotated, Any, Generic, TypeVar
from uuid import UUID

import msgspec
from litestar.params import QueryParameter
from sqlalchemy import Select, and_, or_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql import ColumnElement

from tellback_server.http.errors import BadRequest
from tellback_server.security import b64url, b64url_decode

T = TypeVar("T")

DEFAULT_LIMIT = 25
MAX_LIMIT = 100


class Page(msgspec.Struct, Generic[T]):
    items: list[T]
    next_cursor: str | None


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    at: Annotated[dt.datetime, msgspec.Meta(tz=True)]
    id: UUID


_cursor_decoder = msgspec.json.Decoder(Cursor)


def encode_cursor(at: dt.datetime, id_: UUID) -> str:
    return b64url(msgspec.json.encode(Cursor(at=at, id=id_)))


def decode_cursor(cursor: str | None) -> Cursor | None:
    if cursor is None or cursor == "":
        return None
    try:
        decoded = _cursor_decoder.decode(b64url_decode(cursor))
        # In UTC, as the cursors this server makes: one whose time has no UTC equivalent
        # (year 1 at +01:00) would fail as a bound parameter.
        return Cursor(at=decoded.at.astimezone(dt.UTC), id=decoded.id)
    except (msgspec.DecodeError, binascii.Error, ValueError, OverflowError):
        raise BadRequest("cursor is not valid; pass the next_cursor of a previous page") from None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be from 1 to {MAX_LIMIT}")
    return limit


def next_cursor_for(rows: Sequence[tuple[dt.datetime, UUID]], limit: int) -> str | None:
    """Given ``limit + 1`` fetched keys, the cursor of the last returned row (or None)."""
    if len(rows) <= limit:
        return None
    at, id_ = rows[limit - 1]
    return encode_cursor(at, id_)


Limit = Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT, description="page size, 1-100")]


def after(at_col: Any, id_col: Any, at: Any, id_: Any, *, descending: bool) -> ColumnElement[bool]:
    """Rows strictly past the key (``at``, ``id_``: values or bound parameters) in
    (at, id) order."""
    if descending:
        return or_(at_col < at, and_(at_col == at, id_col < id_))
    return or_(at_col > at, and_(at_col == at, id_col > id_))


def keyset_order(at_col: Any, id_col: Any, *, descending: bool) -> tuple[Any, Any]:
    """ORDER BY (at, id), the order :func:`after` pages through."""
    return (at_col.desc(), id_col.desc()) if descending else (at_col, id_col)


async def keyset_page(
    db: AsyncSession,
    stmt: Select[tuple[T]],
    at_col: InstrumentedAttribute[dt.datetime],
    id_col: InstrumentedAttribute[UUID],
    cursor: str | None,
    limit: int,
    *,
    descending: bool = False,
) -> tuple[list[T], str | None]:
    """One page of ORM rows in (at, id) order, and the cursor of the next page."""
    check_limit(limit)
    if (c := decode_cursor(cursor)) is not None:
        stmt = stmt.where(after(at_col, id_col, c.at, c.id, descending=descending))
    order = keyset_order(at_col, id_col, descending=descending)
    rows = list(await db.scalars(stmt.order_by(*order).limit(limit + 1)))
    keys = [(getattr(r, at_col.key), getattr(r, id_col.key)) for r in rows]
    return rows[:limit], next_cursor_for(keys, limit)
