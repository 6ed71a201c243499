"""The ``tellback`` command: serve, worker, migrate, admin, openapi."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import structlog
import uvicorn
from sqlalchemy import func, select

from tellback_server.cli.dev import dev
from tellback_server.http.server import Server
from tellback_server.logging import configure_logging
from tellback_server.settings import Settings, SettingsError, load_settings, resolve_secret_key

T = TypeVar("T")
log = structlog.get_logger("tellback.cli")


def _settings(need_secret: bool = True) -> Settings:
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
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
    return settings


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


async def _migrate(settings: Settings) -> str | None:
    from tellback_server.db.engine import Database
    from tellback_server.db.migrate import current_revision, upgrade

    db = Database(settings, pool_size=2)
    try:
        await upgrade(db.engine)
        return await current_revision(db.engine)
    finally:
        await db.dispose()


@main.command()
def migrate() -> None:
    """Apply database migrations (idempotent; safe to run from several processes)."""
    settings = _settings(need_secret=False)
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


@admin.command("create-token")
@click.option("--name", default="cli", show_default=True, help="A label for the token.")
def create_token(name: str) -> None:
    """Create an admin token; it is printed alone on the last line of stdout."""
    settings = _settings(need_secret=False)
    if settings.is_embedded_default:
        _run(lambda: _migrate(settings))
    token = _run(lambda: _create_admin_token(settings, name))
    click.echo("New admin token (shown once; store it now):", err=True)
    click.echo(token)


async def _first_start_token(settings: Settings) -> str | None:
    from tellback_server.db.engine import Database
    from tellback_server.db.models import AdminToken

    db = Database(settings, pool_size=2)
    try:
        async with db.session(write=True) as session:
            if await session.scalar(select(func.count()).select_from(AdminToken)):
                return None
        return await _create_admin_token(settings, "first-start")
    finally:
        await db.dispose()


async def _check_revision(settings: Settings) -> None:
    from alembic.script import ScriptDirectory

    from tellback_server.db.engine import Database
    from tellback_server.db.migrate import alembic_config, current_revision

    db = Database(settings, pool_size=2)
    try:
        current = await current_revision(db.engine)
    finally:
        await db.dispose()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if current != head:
        raise SettingsError(
            f"TELLBACK_DATABASE_URL: database is at revision {current}, code expects {head}; "
            "run `tellback migrate` (or pass --migrate)"
        )


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

    settings = _settings()
    if host is not None or port is not None:
        from dataclasses import replace

        settings = replace(settings, host=host or settings.host, port=port or settings.port)
    migrate_first = settings.is_sqlite if do_migrate is None else do_migrate

    async def start() -> None:
        if migrate_first:
            await _migrate(settings)
        else:
            await _check_revision(settings)
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
@_LOOP_OPTION
def worker(concurrency: int | None, plugins: tuple[str, ...], once: bool, loop: str) -> None:
    """Run only the job worker (scale out with several of these on PostgreSQL)."""
    from tellback_server.asgi import build_state
    from tellback_server.jobs.worker import Worker
    from tellback_server.plugins import build_registry

    settings = _settings()
    registry = build_registry(plugins)

    async def run() -> None:
        if settings.is_sqlite:
            await _migrate(settings)
        else:
            await _check_revision(settings)
        state = build_state(settings)
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
            await w.run(stop)
        finally:
            await state.db.dispose()

    _run(run, loop)


@main.command()
def openapi() -> None:
    """Print the OpenAPI 3.1 document (what /schema/openapi.json serves)."""
    from tellback_server.asgi import create_app
    from tellback_server.settings import Settings

    app = create_app(Settings(database_url="sqlite+aiosqlite:///:memory:", secret_key="x" * 32))
    click.echo(json.dumps(app.openapi_schema.to_schema(), indent=2, sort_keys=True))


main.add_command(dev)
