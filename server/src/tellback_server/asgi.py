"""``create_app(settings)``: the one place the Litestar application is assembled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from tellback_server.db.engine import Database
from tellback_server.db.listen import listen_forever
from tellback_server.domain.agents.controllers import AdminAgentsController, AgentMeController
from tellback_server.domain.apps.controllers import AdminAppsController
from tellback_server.domain.attachments.controllers import (
    AgentAttachmentsController,
    ClientUploadsController,
    StorageController,
)
from tellback_server.domain.console.controllers import ConsoleAuthController, ConsoleController
from tellback_server.domain.console.pages import template_config, with_console_errors
from tellback_server.domain.conversations.controllers import (
    AgentConversationsController,
    ClientConversationsController,
)
from tellback_server.domain.events.broker import EventBroker
from tellback_server.domain.events.controllers import (
    AgentEventsController,
    ClientEventsController,
)
from tellback_server.domain.identity.controllers import MeController, SessionsController
from tellback_server.domain.ops.controllers import healthz, metrics, readyz
from tellback_server.domain.push.controllers import (
    AdminPushController,
    AgentDevicesController,
    ClientDevicesController,
)
from tellback_server.domain.push.delivery import close_clients
from tellback_server.domain.users.controllers import AdminUsersController
from tellback_server.domain.webhooks.controllers import AdminWebhooksController
from tellback_server.domain.webhooks.delivery import close_http_client
from tellback_server.http.auth_cache import AUTH_CHANGED, PrincipalCache
from tellback_server.http.deps import DEPENDENCIES
from tellback_server.http.errors import exception_handlers
from tellback_server.http.middleware import request_id_middleware
from tellback_server.http.openapi import RESPONSE_HEADERS, document_responses
from tellback_server.http.text import TellbackRequest, refuse_nul_in_url
from tellback_server.jobs.notify import JobNotifier
from tellback_server.jobs.registry import JobRegistry
from tellback_server.jobs.worker import Worker, asyncpg_dsn
from tellback_server.metrics import Metrics
from tellback_server.ratelimit import RateLimiter, SharedLimits
from tellback_server.security import Sealer
from tellback_server.settings import Settings
from tellback_server.state import AppState
from tellback_server.storage.base import ObjectStore, StorageError
from tellback_server.storage.local import LocalStore
from tellback_server.storage.s3 import S3Store

log = structlog.get_logger("tellback.app")

API_VERSION = "1.0.0"


def build_state(settings: Settings) -> AppState:
    if settings.secret_key is None:
        raise ValueError("settings.secret_key must be resolved before building the app")
    db = Database(settings)
    notifier = JobNotifier()
    notifier.install_commit_hook(db)
    metrics = Metrics()
    db.observe_commits(metrics.observe_commit)
    events = EventBroker(metrics)
    events.install_commit_hook(db)
    principals: PrincipalCache[Any] = PrincipalCache(settings.auth_cache_seconds)
    db.on_commit(AUTH_CHANGED, principals.clear)
    limiter = RateLimiter()
    shared_limits = None
    if not db.is_sqlite and settings.rate_limit_sync_seconds > 0:
        shared_limits = SharedLimits(
            limiter, db.engine, settings.secret_key, every=settings.rate_limit_sync_seconds
        )
    return AppState(
        settings=settings,
        db=db,
        limiter=limiter,
        shared_limits=shared_limits,
        principals=principals,
        metrics=metrics,
        sealer=Sealer(settings.secret_key),
        notifier=notifier,
        store=build_store(settings),
        events=events,
    )


def _listen(state: AppState, *, worker: bool) -> list[asyncio.Task[None]]:
    """PostgreSQL: the process's one LISTEN connection, for the live streams (events
    other processes committed), the session-check cache (access changed elsewhere) and
    the in-process worker (jobs queued elsewhere); and the task that reads the events."""
    channels = [state.events.channel(state.db), state.principals.channel(state.db.instance)]
    if worker:
        channels.append(state.notifier.channel())
    dsn = asyncpg_dsn(state.db.url)
    return [
        asyncio.create_task(listen_forever(dsn, channels, name="app")),
        asyncio.create_task(state.events.load_forever(state.db)),
    ]


def build_store(settings: Settings) -> ObjectStore:
    if settings.s3 is not None:
        return S3Store(settings.s3)
    assert settings.secret_key is not None
    return LocalStore(settings.data_dir / "blobs", settings.secret_key, settings.base_url())


def openapi_config() -> OpenAPIConfig:
    bearer = SecurityScheme(type="http", scheme="bearer")
    return OpenAPIConfig(
        title="Tellback API",
        version=API_VERSION,
        description=(
            "In-app feedback and support. Client endpoints take a session token, agent "
            "endpoints an agent token, admin endpoints an admin token, all as "
            "`Authorization: Bearer`. Errors are RFC 9457 problem+json with a stable `code`."
        ),
        path="/schema",
        render_plugins=[ScalarRenderPlugin()],
        components=Components(
            security_schemes={"sessionToken": bearer, "agentToken": bearer, "adminToken": bearer},
            headers=dict(RESPONSE_HEADERS),
        ),
        use_handler_docstrings=True,
    )


async def stopped(task: asyncio.Task[None], seconds: float, what: str) -> None:
    """Wait for a background task told to stop, cancelling it after ``seconds``. Never
    raises: the rest of the shutdown (push clients, the connection pool) still runs when
    a task overruns (the database down: a pool timeout, then the worker's wait for its
    running jobs) or failed."""
    try:
        await asyncio.wait_for(task, timeout=seconds)
    except TimeoutError:
        log.warning("shutdown.task_cancelled", task=what, after_seconds=seconds)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the shutdown itself was cancelled, not the task
    except Exception:
        log.exception("shutdown.task_failed", task=what)


def create_app(
    settings: Settings,
    *,
    registry: JobRegistry | None = None,
    run_worker: bool = False,
    state: AppState | None = None,
) -> Litestar:
    app_state = state or build_state(settings)
    registry = registry or JobRegistry()

    @asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = None
        try:
            await app_state.store.ensure_ready()
        except StorageError as exc:
            # One line, as the worker's: the reason is all of it, a traceback ~60 lines.
            log.error("storage.not_ready", error=str(exc))  # noqa: TRY400
        if run_worker:  # (it hears NOTIFY tellback_jobs through the app's connection)
            task = asyncio.create_task(Worker(app_state, registry, listen=False).run(stop))
        limits = None
        if app_state.shared_limits is not None:
            limits = asyncio.create_task(app_state.shared_limits.run(stop))
        listening: list[asyncio.Task[None]] = []
        if not app_state.db.is_sqlite:
            listening = _listen(app_state, worker=run_worker)
        try:
            yield
        finally:
            app_state.events.close()
            for listener in listening:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            stop.set()
            if limits is not None:  # its last sync, bounded: the database may be down
                await stopped(limits, 5, "rate limit sync")
            if task is not None:
                await stopped(task, 15, "job worker")
            try:
                await close_clients(app_state)
                await close_http_client(app_state)
            finally:
                await app_state.db.dispose()

    app = Litestar(
        route_handlers=[
            healthz,
            readyz,
            metrics,
            SessionsController,
            MeController,
            ClientConversationsController,
            AgentConversationsController,
            AgentMeController,
            ClientUploadsController,
            AgentAttachmentsController,
            StorageController,
            AdminAppsController,
            AdminAgentsController,
            AdminUsersController,
            ClientDevicesController,
            AgentDevicesController,
            AdminPushController,
            ClientEventsController,
            AgentEventsController,
            AdminWebhooksController,
            ConsoleAuthController,
            ConsoleController,
        ],
        template_config=template_config(),
        dependencies=DEPENDENCIES,
        # The console's paths get its error page even for the router's 404 and 405.
        exception_handlers=with_console_errors(exception_handlers()),
        openapi_config=openapi_config(),
        request_max_body_size=settings.max_request_body_bytes,
        request_class=TellbackRequest,
        # Litestar runs only the nearest layer's before_request: a controller or route
        # that sets its own must call refuse_nul_in_url too.
        before_request=refuse_nul_in_url,
        state=State({"tb": app_state, "registry": registry}),
        lifespan=[lifespan],
        debug=False,
        logging_config=None,
    )
    document_responses(app)
    # Around the whole app, not per route: 404/405 from the router carry the id too.
    app.asgi_handler = request_id_middleware(app_state.metrics)(app.asgi_handler)
    return app
