"""The database as the commands find it: reachable, at this release's schema, and
sealed with this ``TELLBACK_SECRET_KEY``; each refusal one line naming the variable."""

from __future__ import annotations

from sqlalchemy.engine import make_url

from tellback_server.settings import Settings, SettingsError


def _where(settings: Settings) -> str:
    """The database's address as an error names it: host:port/name, never the password."""
    if settings.is_sqlite:
        return str(settings.sqlite_path or ":memory:")
    url = make_url(settings.database_url)
    socket_dir = url.query.get("host")
    host = url.host or (socket_dir if isinstance(socket_dir, str) else None) or "localhost"
    return f"{host}:{url.port or 5432}/{url.database or ''}"


def _reason(settings: Settings, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        reason = "no answer within 5 s"
    elif isinstance(exc, ConnectionRefusedError):
        reason = "connection refused (is the server running, and on this port?)"
    elif isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    password = make_url(settings.database_url).password
    if password:  # (no driver is known to say it; this keeps it so)
        reason = reason.replace(str(password), "***")
    return reason


def _connect_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    import asyncpg
    from sqlalchemy.exc import DBAPIError

    return (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, DBAPIError, sqlite3.Error)


async def _database_heads(settings: Settings) -> tuple[str, ...]:
    """Connect and read the database's migration revisions (none: never migrated). A
    database that cannot be reached is a one-line :class:`SettingsError`."""
    from alembic.runtime.migration import MigrationContext

    from tellback_server.db.engine import Database

    verb = "cannot open" if settings.is_sqlite else "cannot connect to"
    errors = _connect_errors()
    try:
        db = Database(settings, pool_size=1)  # (creates the SQLite file's directory)
    except errors as exc:
        raise SettingsError(
            f"TELLBACK_DATABASE_URL: {verb} {_where(settings)}: {_reason(settings, exc)}"
        ) from None
    try:
        async with db.engine.connect() as conn:
            heads: tuple[str, ...] = await conn.run_sync(
                lambda sync_conn: MigrationContext.configure(sync_conn).get_current_heads()
            )
    except errors as exc:
        raise SettingsError(
            f"TELLBACK_DATABASE_URL: {verb} {_where(settings)}: {_reason(settings, exc)}"
        ) from None
    finally:
        await db.dispose()
    return heads


async def check_database(settings: Settings, *, hint: str | None) -> tuple[str, ...]:
    """Refuse a database that cannot be reached or that a newer release migrated; with a
    ``hint``, also one that is not at this release's schema (``hint`` says what to run).
    Returns the database's revisions."""
    from alembic.script import ScriptDirectory

    from tellback_server.db.migrate import alembic_config

    heads = await _database_heads(settings)
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    known = {rev.revision for rev in script.walk_revisions()}
    newer = [rev for rev in heads if rev not in known]
    if newer:
        raise SettingsError(
            f"TELLBACK_DATABASE_URL: the database was migrated by a newer Tellback release "
            f"(revision {newer[0]}; this release, {_version()}, knows revisions up to {head}): "
            "run that release or a later one; do not downgrade the database"
        )
    if hint is not None and heads != (head,):
        state = f"at revision {heads[0]}" if heads else "not migrated (no Tellback tables)"
        raise SettingsError(
            f"TELLBACK_DATABASE_URL: database is {state}, code expects {head}; {hint}"
        )
    return heads


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tellback-server")
    except PackageNotFoundError:  # pragma: no cover (a source tree without metadata)
        return "this release"


async def migrate_database(settings: Settings) -> str | None:
    from tellback_server.db.engine import Database
    from tellback_server.db.migrate import current_revision, upgrade

    await check_database(settings, hint=None)
    db = Database(settings, pool_size=2)
    try:
        await upgrade(db.engine)
        return await current_revision(db.engine)
    finally:
        await db.dispose()


async def check_revision(settings: Settings) -> None:
    await check_database(settings, hint="run `tellback migrate` (or pass --migrate)")


async def refuse_foreign_secret_key(settings: Settings) -> None:
    """Refuse a TELLBACK_SECRET_KEY that cannot open the database's sealed secrets (a
    data dir restored without its key file, a process started without the shared key):
    it would answer 500 to every identified session and sign nothing right."""
    from tellback_server.db.engine import Database
    from tellback_server.domain.apps.services import check_secret_key
    from tellback_server.security import Sealer

    assert settings.secret_key is not None  # (resolved by _settings)
    db = Database(settings, pool_size=1)
    try:
        await check_secret_key(db, Sealer(settings.secret_key))
    finally:
        await db.dispose()
