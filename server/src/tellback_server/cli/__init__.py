"""The ``tellback`` command: serve, worker, migrate, admin, openapi."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import resource
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import click
import structlog
import uvicorn

from tellback_server.cli.admin import admin, first_start_token
from tellback_server.cli.common import LOOP_OPTION, command_settings, run_async
from tellback_server.cli.database import (
    check_revision,
    migrate_database,
    refuse_foreign_secret_key,
)
from tellback_server.cli.dev import dev
from tellback_server.http.server import GuardedHttpToolsProtocol, Server
from tellback_server.settings import Settings, SettingsError
from tellback_server.storage.base import StorageError

log = structlog.get_logger("tellback.cli")


@click.group()
@click.version_option(package_name="tellback-server")
def main() -> None:
    """Tellback: self-hostable in-app feedback and support."""


@main.command()
def migrate() -> None:
    """Apply database migrations (idempotent; safe to run from several processes)."""
    settings = command_settings(need_secret=False, check_names=True)
    revision = run_async(lambda: migrate_database(settings))
    click.echo(f"database at revision {revision}")


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
        http=GuardedHttpToolsProtocol,
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
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port (default TELLBACK_PORT or 8080).",
)
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
@LOOP_OPTION
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

    settings = command_settings(check_names=True)
    if host is not None or port is not None:
        from dataclasses import replace

        settings = replace(
            settings,
            host=host or settings.host,  # an empty --host is the default, as TELLBACK_HOST=
            port=settings.port if port is None else port,
        )
    migrate_first = settings.is_sqlite if do_migrate is None else do_migrate

    async def start() -> None:
        if migrate_first:
            await migrate_database(settings)
        else:
            await check_revision(settings)
        await refuse_foreign_secret_key(settings)
        # Bound before anything is said or started: a port in use is one line, with no
        # first-start token printed and no worker started to be stopped again.
        sockets = listening_sockets(settings.host, settings.port)
        try:
            await _serve(sockets)
        finally:
            for sock in sockets:
                sock.close()

    async def _serve(sockets: list[socket.socket]) -> None:
        token = await first_start_token(settings)
        if token is not None:
            click.echo(
                "First start: an admin token was created (shown once; store it now):", err=True
            )
            click.echo(token)
            sys.stdout.flush()
        open_files = raise_open_file_limit()  # (before the app: its stream cap reads it)
        app = create_app(settings, registry=build_registry(plugins), run_worker=not no_worker)
        freeze_startup_heap()
        config = uvicorn_config(app, settings.host, settings.port)
        log.info(
            "serve.listening",
            url=f"http://{settings.host}:{settings.port}",
            open_files=open_files,
            database="sqlite" if settings.is_sqlite else "postgresql",
            worker=not no_worker,
            loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )
        _warn_about_links_and_storage(settings)
        server = Server(config, on_stop=app.state["tb"].events.close)
        running = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            running.add_signal_handler(sig, server.request_exit)
        await server.serve(sockets=sockets)

    run_async(start, loop)


def raise_open_file_limit() -> int:
    """The soft limit on open files raised to the hard one (as Go's runtime and nginx's
    ``worker_rlimit_nofile`` do): every connection, event stream and database
    connection takes a descriptor, and a service manager's usual soft limit (1,024)
    lets a few hundred slow clients stop the process from accepting anything, health
    probes included. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return int(soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):
        return int(soft)
    return wanted


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address ``host`` names, as asyncio's ``create_server``
    (which uvicorn calls) binds them; a port in use is a :class:`SettingsError`."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise SettingsError(f"TELLBACK_HOST (or --host): cannot resolve {host}: {exc}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # (as asyncio: IPv4 gets a socket of its own)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise SettingsError(
            f"TELLBACK_PORT (or --port): cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    return sockets


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
@LOOP_OPTION
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

    settings = command_settings(check_names=True)
    registry = build_registry(plugins)

    async def run() -> None:
        if settings.is_sqlite:
            await migrate_database(settings)
        else:
            await check_revision(settings)
        await refuse_foreign_secret_key(settings)
        state = build_state(settings)
        try:  # said at start, not first found by a job (which then waits it out)
            await state.store.ensure_ready()
        except StorageError as exc:
            log.warning("storage.not_ready", error=str(exc))
        w = Worker(state, registry, concurrency=concurrency)
        raise_open_file_limit()
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
            with _metrics_server(
                _worker_registry(state.metrics.registry), metrics_host, metrics_port
            ):
                await w.run(stop)
        finally:
            await state.db.dispose()

    run_async(run, loop)


# Gauges of the whole queue, read from the database by an API process's /metrics
# (domain/ops): a worker never fills them, and a 0 from each worker's scrape would hide
# the backlog from an alert on, say, max(tellback_jobs_oldest_due_seconds).
API_ONLY_METRICS = frozenset(
    {
        "tellback_jobs_queued",
        "tellback_jobs_oldest_due_seconds",
        "tellback_jobs_backlog_read_timestamp_seconds",
    }
)


def _worker_registry(registry: Any) -> Any:
    """What ``tellback worker --metrics-port`` serves: the process's metrics but the
    backlog gauges, which only an API process's scrape reads."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector

    class WithoutBacklog(Collector):
        def collect(self) -> Iterator[Any]:
            return (m for m in registry.collect() if m.name not in API_ONLY_METRICS)

    served = CollectorRegistry(auto_describe=False)
    served.register(WithoutBacklog())
    return served


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


main.add_command(admin)
main.add_command(dev)
