"""Request id and the one canonical log line per request."""

from __future__ import annotations

import re
import time
from os import urandom

import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from tellback_server.metrics import Metrics

log = structlog.get_logger("tellback.http")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_middleware(metrics: Metrics) -> type:
    class RequestIdMiddleware:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":  # type: ignore[comparison-overlap]
                await self.app(scope, receive, send)
                return
            incoming = None
            for name, value in scope["headers"]:
                if name == b"x-request-id":
                    incoming = value.decode("latin-1")
                    break
            # 32 random hex digits, as uuid4().hex, without building the UUID.
            request_id = incoming if incoming and _VALID_ID.match(incoming) else urandom(16).hex()
            scope.setdefault("state", {})["request_id"] = request_id
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(request_id=request_id)
            started = time.perf_counter()
            status = 500

            async def send_wrapper(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    headers = list(message.get("headers", []))
                    headers.append((b"x-request-id", request_id.encode()))
                    message["headers"] = headers
                await send(message)

            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                elapsed = time.perf_counter() - started
                route = scope.get("path_template") or "unmatched"
                state = scope.get("state", {})
                metrics.observe_request(
                    str(scope.get("method", "GET")), str(route), status, elapsed
                )
                log.info(
                    "http.request",
                    method=scope.get("method"),
                    path=scope.get("path"),
                    route=str(route),
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                    app_id=state.get("app_id"),
                )
                structlog.contextvars.clear_contextvars()

    return RequestIdMiddleware
