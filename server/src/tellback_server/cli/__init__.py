"""The ``tellback`` command: serve, worker, migrate, admin, openapi."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click
import structlog
import uvicorn
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url

from tellback_server.cli.dev import dev
from tellback_server.http.server import Server
from tellback_server.logging import configure_logging
from tellback_server.settings import (
    Settings,
    SettingsError,
    ensure_data_dir,
    load_settings,
    resolve_secret_key,
    unknown_variables,
)
from tellback_server.storage.base import StorageError

T = TypeVar("T")
log = structlog.get_logger("tellback.cli")


def _settings(need_secret: bool = True, *, check_names: bool = False) -> Settings:
    """The settings, logging configured; a bad value is a one-line error naming it.

    ``need_secret``: the command runs the server or its workers (``serve``, ``worker``),
    which need the secret key (from the data dir when unset) and local storage.
    ``check_names``: warn of ``TELLBACK_*`` variables that no setting reads.
    """
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        configure_logging(settings.log_level, settings.log_format)
        if check_names:
            _warn_about_unknown_variables()
        if _uses_data_dir(settings, need_secret) and not ensure_data_dir(settings.data_dir):
            log.warning(
                "settings.data_dir_not_private",
                path=str(settings.data_dir),
                detail="other users may read the data dir (the database, users' files, the "
                "generated key): make it accessible to Tellback's user only (chmod 700)",
            )
        if need_secret:
            settings, from_file = resolve_secret_key(settings)
            if from_file and not settings.is_embedded_default:
                log.warning(
                    "settings.secret_key_from_data_dir",
                    path=str(settings.data_dir / "secret_key"),
                    hint="set TELLBACK_SECRET_KEY: every node must share one key",
                )
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # the data dir cannot be created or read
        raise click.ClickException(
            f"TELLBACK_DATA_DIR: cannot use {settings.data_dir}: {exc.strerror or exc}"
        ) from None
    return settings


def _uses_data_dir(settings: Settings, serving: bool) -> bool:
    """Whether this command keeps anything in the data dir: the SQLite file, and for
    the server and its workers local storage and the generated key."""
    path = settings.sqlite_path
    if path is not None and settings.data_dir.absolute() in path.absolute().parents:
        return True
    return serving and (settings.s3 is None or settings.secret_key is None)


def _warn_about_unknown_variables() -> None:
    """A misspelled setting is ignored, so the server runs on its default (local disk
    for a misspelled TELLBACK_S3_ENDPOINT): name it, never its value."""
    unknown = unknown_variables()
    if unknown:
        log.warning(
            "settings.unknown_variables",
            detail="these TELLBACK_* variables are not Tellback settings and are ignored",
            names=[f"{name} (did you mean {close}?)" if close else name for name, close in unknown],
        )


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a long-running command runs on: uvloop where it is installed.

    ``auto`` is uvicorn's own choice, and the one a bare Litestar app under
    ``uvicorn`` gets: uvloop (part of ``uvicorn[standard]``) when it can be imported,
    else asyncio's. uvloop's sockets cost a fraction of asyncio's selector transports,
    which a request pays for on the HTTP connection and again per database round trip.
    """
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise click.ClickException("--loop uvloop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


_LOOP_OPTION = click.option(
    "--loop",
    type=click.Choice(["auto", "uvloop", "asyncio"]),
    default="auto",
    show_default=True,
    help="Event loop: auto picks uvloop when installed.",
)


def _run(coro_fn: Callable[[], Any], loop: str = "asyncio") -> Any:
    try:
        with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
            return runner.run(coro_fn())
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="tellback-server")
def main() -> None:
    """Tellback: self-hostable in-app feedback and support."""


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


async def _check_database(settings: Settings, *, hint: str | None) -> tuple[str, ...]:
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


async def _migrate(settings: Settings) -> str | None:
    from tellback_server.db.engine import Database
    from tellback_server.db.migrate import current_revision, upgrade

    await _check_database(settings, hint=None)
    db = Database(settings, pool_size=2)
    try:
        await upgrade(db.engine)
        return await current_revision(db.engine)
    finally:
        await db.dispose()


@main.command()
def migrate() -> None:
    """Apply database migrations (idempotent; safe to run from several processes)."""
    settings = _settings(need_secret=False, check_names=True)
    revision = _run(lambda: _migrate(settings))
    click.echo(f"database at revision {revision}")


async def _create_admin_token(settings: Settings, name: str) -> str:
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


@main.group()
def admin() -> None:
    """Operator commands."""


_ADMIN_HINT = "run `tellback migrate` first"


def _admin_settings(*, may_migrate: bool) -> Settings:
    """An admin command's settings, its database checked (and, ``may_migrate``, brought
    to this release's schema on the embedded SQLite default, as ``serve`` does)."""
    settings = _settings(need_secret=False)
    if may_migrate and settings.is_embedded_default:
        _run(lambda: _migrate(settings))
    else:
        _run(lambda: _check_database(settings, hint=_ADMIN_HINT))
    return settings


@admin.command("create-token")
@click.option("--name", default="cli", show_default=True, help="A label for the token.")
def create_token(name: str) -> None:
    """Create an admin token; it is printed alone on the last line of stdout."""
    settings = _admin_settings(may_migrate=True)
    token = _run(lambda: _create_admin_token(settings, name))
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
    tokens = _run(lambda: _admin_tokens(settings))
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
    token_id, name, revoked = _run(lambda: _revoke_admin_token(settings, token_id_or_name))
    if revoked:
        click.echo(f"revoked admin token {token_id} ({name})")
    else:
        click.echo(f"admin token {token_id} ({name}) was already revoked")


async def _first_start_token(settings: Settings) -> str | None:
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
        return await _create_admin_token(settings, "first-start")
    finally:
        await db.dispose()


async def _check_revision(settings: Settings) -> None:
    await _check_database(settings, hint="run `tellback migrate` (or pass --migrate)")


async def _check_secret_key(settings: Settings) -> None:
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


def uvicorn_config(app: Any, host: str, port: int) -> uvicorn.Config:
    """How ``tellback serve`` runs an app under uvicorn (the benchmark's floor app too)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
        server_header=False,
    )


# Container objects allocated (net of those freed) between two young collections:
# CPython's default is 700.
GC_YOUNG_THRESHOLD = 10_000


def freeze_startup_heap() -> None:
    """Take what startup built out of the garbage collector's view, and collect the
    young generation less often.

    Modules, the app, SQLAlchemy's metadata and caches: about 200,000 objects that live
    as long as the process. Every full collection walked them all, a pause of ~100 ms
    for every request in flight (the p99 of ``tests/bench/bench_ingest.py``); frozen,
    a full collection walks only what was made since.

    With the default threshold (700), a young collection ran every 25 or so requests
    under load and walked the live objects of every request in flight (32 at a time in
    the benchmark), promoting them to older generations to be walked again: 9-11 us
    of a create's CPU (``tests/bench/inproc_ingest.py``). At 10,000, most of a
    request's objects are freed by reference counting before a collection sees them:
    about 1 us.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def _warn_about_links_and_storage(settings: Settings) -> None:
    """What works on one machine but not behind a load balancer, said at start."""
    if settings.public_url is None and settings.host in {"0.0.0.0", "::", ""}:  # noqa: S104
        log.warning(
            "serve.no_public_url",
            detail="upload and attachment links will name this listening address, which "
            "clients cannot reach: set TELLBACK_PUBLIC_URL to the address they use",
            url=settings.base_url(),
        )
    if settings.s3 is None and not settings.is_sqlite:
        log.warning(
            "serve.local_storage",
            detail="attachments are kept on this machine's disk: with more than one server "
            "or worker machine, set TELLBACK_S3_* so that every process sees every file",
            path=str(settings.data_dir / "blobs"),
        )


@main.command()
@click.option("--host", default=None, help="Bind address (default TELLBACK_HOST or 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default TELLBACK_PORT or 8080).")
@click.option("--no-worker", is_flag=True, help="Do not run the job worker in this process.")
@click.option(
    "--migrate/--no-migrate",
    "do_migrate",
    default=None,
    help="Apply migrations first (default: yes on SQLite, no on PostgreSQL).",
)
@click.option(
    "--plugin", "plugins", multiple=True, help="module:function registering job handlers."
)
@_LOOP_OPTION
def serve(
    host: str | None,
    port: int | None,
    no_worker: bool,
    do_migrate: bool | None,
    plugins: tuple[str, ...],
    loop: str,
) -> None:
    """Run the API (and, unless --no-worker, the in-process job worker)."""
    from tellback_server.asgi import create_app
    from tellback_server.plugins import build_registry

    settings = _settings(check_names=True)
    if host is not None or port is not None:
        from dataclasses import replace

        settings = replace(settings, host=host or settings.host, port=port or settings.port)
    migrate_first = settings.is_sqlite if do_migrate is None else do_migrate

    async def start() -> None:
        if migrate_first:
            await _migrate(settings)
        else:
            await _check_revision(settings)
        await _check_secret_key(settings)
        token = await _first_start_token(settings)
        if token is not None:
            click.echo(
                "First start: an admin token was created (shown once; store it now):", err=True
            )
            click.echo(token)
            sys.stdout.flush()
        app = create_app(settings, registry=build_registry(plugins), run_worker=not no_worker)
        freeze_startup_heap()
        config = uvicorn_config(app, settings.host, settings.port)
        log.info(
            "serve.listening",
            url=f"http://{settings.host}:{settings.port}",
            database="sqlite" if settings.is_sqlite else "postgresql",
            worker=not no_worker,
            loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )
        _warn_about_links_and_storage(settings)
        server = Server(config, on_stop=app.state["tb"].events.close)
        running = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            running.add_signal_handler(sig, server.request_exit)
        await server.serve()

    _run(start, loop)


@main.command()
@click.option("--concurrency", type=int, default=None, help="Jobs run at once (default 4).")
@click.option(
    "--plugin", "plugins", multiple=True, help="module:function registering job handlers."
)
@click.option("--once", is_flag=True, help="Run due jobs until none is left, then exit.")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve this worker's Prometheus metrics (job and webhook attempts) on this port.",
)
@click.option(
    "--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port."
)
@_LOOP_OPTION
def worker(
    concurrency: int | None,
    plugins: tuple[str, ...],
    once: bool,
    metrics_port: int | None,
    metrics_host: str,
    loop: str,
) -> None:
    """Run only the job worker (scale out with several of these on PostgreSQL)."""
    from tellback_server.asgi import build_state
    from tellback_server.jobs.worker import Worker
    from tellback_server.plugins import build_registry

    settings = _settings(check_names=True)
    registry = build_registry(plugins)

    async def run() -> None:
        if settings.is_sqlite:
            await _migrate(settings)
        else:
            await _check_revision(settings)
        await _check_secret_key(settings)
        state = build_state(settings)
        try:  # said at start, not first found by a job (which then waits it out)
            await state.store.ensure_ready()
        except StorageError as exc:
            log.warning("storage.not_ready", error=str(exc))
        w = Worker(state, registry, concurrency=concurrency)
        freeze_startup_heap()
        try:
            if once:
                count = await w.run_until_idle()
                click.echo(f"ran {count} job(s)")
                return
            stop = asyncio.Event()
            running = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                running.add_signal_handler(sig, stop.set)
            with _metrics_server(state.metrics.registry, metrics_host, metrics_port):
                await w.run(stop)
        finally:
            await state.db.dispose()

    _run(run, loop)


@contextlib.contextmanager
def _metrics_server(registry: Any, host: str, port: int | None) -> Iterator[None]:
    """A worker has no HTTP API: its metrics (job and webhook attempts it ran) are served
    on a port of their own when asked for, by prometheus_client's server in a thread.
    Any path answers with the metrics, so a process manager may probe it as well."""
    if port is None:
        yield
        return
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise SettingsError(f"--metrics-port: cannot listen on {host}:{port}: {exc}") from None
    log.info("worker.metrics_listening", url=f"http://{host}:{port}/metrics")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@main.command()
def openapi() -> None:
    """Print the OpenAPI 3.1 document (what /schema/openapi.json serves)."""
    from tellback_server.asgi import create_app
    from tellback_server.settings import Settings

    app = create_app(Settings(database_url="sqlite+aiosqlite:///:memory:", secret_key="x" * 32))
    click.echo(json.dumps(app.openapi_schema.to_schema(), indent=2, sort_keys=True))


main.add_command(dev)
