"""``tellback admin``: operator tokens (create, list, revoke), and the first-start one."""

from __future__ import annotations

import datetime as dt
import json

import click
import structlog
from sqlalchemy import func, select, update

from tellback_server.cli.common import command_settings, run_async
from tellback_server.cli.database import check_database, migrate_database
from tellback_server.settings import Settings, SettingsError

log = structlog.get_logger("tellback.cli")


async def create_admin_token(settings: Settings, name: str) -> str:
    from tellback_server.db.engine import Database
    from tellback_server.db.models import AdminToken
    from tellback_server.security import ADMIN_TOKEN_PREFIX, hash_token, new_token

    db = Database(settings, pool_size=2)
    try:
        token = new_token(ADMIN_TOKEN_PREFIX)
        async with db.session(write=True) as session:
            session.add(AdminToken(name=name, token_hash=hash_token(token)))
        return token
    finally:
        await db.dispose()


@click.group()
def admin() -> None:
    """Operator commands."""


_ADMIN_HINT = "run `tellback migrate` first"


def _admin_settings(*, may_migrate: bool) -> Settings:
    """An admin command's settings, its database checked (and, ``may_migrate``, brought
    to this release's schema on the embedded SQLite default, as ``serve`` does)."""
    settings = command_settings(need_secret=False)
    if may_migrate and settings.is_embedded_default:
        run_async(lambda: migrate_database(settings))
    else:
        run_async(lambda: check_database(settings, hint=_ADMIN_HINT))
    return settings


@admin.command("create-token")
@click.option("--name", default="cli", show_default=True, help="A label for the token.")
def create_token(name: str) -> None:
    """Create an admin token; it is printed alone on the last line of stdout."""
    settings = _admin_settings(may_migrate=True)
    token = run_async(lambda: create_admin_token(settings, name))
    click.echo("New admin token (shown once; store it now):", err=True)
    click.echo(token)


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _admin_tokens(settings: Settings) -> list[dict[str, str | None]]:
    from tellback_server.db.engine import Database
    from tellback_server.db.models import AdminToken

    db = Database(settings, pool_size=2)
    try:
        async with db.session(write=False) as session:
            rows = await session.execute(
                select(
                    AdminToken.id,
                    AdminToken.name,
                    AdminToken.created_at,
                    AdminToken.last_used_at,
                    AdminToken.revoked_at,
                ).order_by(AdminToken.created_at, AdminToken.id)
            )
            return [
                {
                    "id": str(token_id),
                    "name": name,
                    "created": _when(created),
                    "last_used": None if used is None else _when(used),
                    "revoked": None if revoked is None else _when(revoked),
                }
                for token_id, name, created, used, revoked in rows
            ]
    finally:
        await db.dispose()


@admin.command("list-tokens")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
def list_tokens(as_json: bool) -> None:
    """List admin tokens: id, name, created, last used, revoked (never the token)."""
    settings = _admin_settings(may_migrate=False)
    tokens = run_async(lambda: _admin_tokens(settings))
    if as_json:
        click.echo(json.dumps(tokens, indent=2))
        return
    header = {"id": "ID", "name": "NAME", "created": "CREATED"}
    header |= {"last_used": "LAST USED", "revoked": "REVOKED"}
    table = [header, *({k: v or "-" for k, v in t.items()} for t in tokens)]
    widths = {k: max(len(str(row[k])) for row in table) for k in header}
    for row in table:
        click.echo("  ".join(f"{row[k]!s:<{widths[k]}}" for k in header).rstrip())


async def _revoke_admin_token(settings: Settings, which: str) -> tuple[str, str, bool]:
    """Revoke the admin token with this id, or the one active token with this name:
    (id, name, whether it was active). The check of every request reads the token's
    row (``http/deps.py``, no cache), so every process refuses it from now on."""
    import uuid

    from tellback_server.db.engine import Database
    from tellback_server.db.models import AdminToken

    try:
        by_id: uuid.UUID | None = uuid.UUID(which)
    except ValueError:
        by_id = None
    db = Database(settings, pool_size=2)
    try:
        async with db.session(write=True) as session:
            match = AdminToken.name == which
            if by_id is not None:
                match = (AdminToken.id == by_id) | match
            found = (
                await session.execute(
                    select(AdminToken.id, AdminToken.name, AdminToken.revoked_at).where(match)
                )
            ).all()
            exact = [row for row in found if row.id == by_id]
            active = [row for row in found if row.revoked_at is None]
            if not found:
                raise SettingsError(f"no admin token has the id or name {which!r}")
            if not exact and len(active) > 1:
                ids = ", ".join(str(row.id) for row in active)
                raise SettingsError(
                    f"{len(active)} active admin tokens are named {which!r} ({ids}): "
                    "revoke one by its id"
                )
            target = (exact or active or found)[0]
            if target.revoked_at is not None:
                return str(target.id), target.name, False
            await session.execute(
                update(AdminToken)
                .where(AdminToken.id == target.id, AdminToken.revoked_at.is_(None))
                .values(revoked_at=func.now())
            )
            return str(target.id), target.name, True
    finally:
        await db.dispose()


@admin.command("revoke-token")
@click.argument("token_id_or_name", metavar="ID_OR_NAME")
def revoke_token(token_id_or_name: str) -> None:
    """Revoke an admin token, by its id or name (see list-tokens); at once, everywhere."""
    settings = _admin_settings(may_migrate=False)
    token_id, name, revoked = run_async(lambda: _revoke_admin_token(settings, token_id_or_name))
    if revoked:
        click.echo(f"revoked admin token {token_id} ({name})")
    else:
        click.echo(f"admin token {token_id} ({name}) was already revoked")


async def first_start_token(settings: Settings) -> str | None:
    """On the embedded SQLite default with no admin token, create one for the caller to
    print. On PostgreSQL no token is printed (a log collector would keep it): a line
    says how to create one."""
    from tellback_server.db.engine import Database
    from tellback_server.db.models import AdminToken

    db = Database(settings, pool_size=2)
    try:
        async with db.session(write=True) as session:
            if await session.scalar(select(func.count()).select_from(AdminToken)):
                return None
        if not settings.is_embedded_default:
            log.warning(
                "serve.no_admin_token",
                detail="no admin token exists: create one with `tellback admin create-token` "
                "(run with the same TELLBACK_DATABASE_URL)",
            )
            return None
        return await create_admin_token(settings, "first-start")
    finally:
        await db.dispose()
