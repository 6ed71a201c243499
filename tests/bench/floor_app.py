"""The ingest route's floor for bench_ingest: Tellback's own app, minus the handler's work.

`tellback serve`'s app (every middleware, the client authentication with its session
lookup and rate limits, the dependencies) with one more route,
``POST /floor/conversations``, declared like ``POST /v1/client/conversations``:
the same authentication, body type and ``Idempotency-Key`` header. Its handler answers a
fixed conversation without touching the database. Between the framework
ceiling (``ceiling_app.py``) and the real route, it shows what the framework and
our request plumbing cost before any feedback is stored. Run with the
``TELLBACK_*`` environment of a migrated database that the real server uses too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import uvicorn
from litestar import Request, Response, post
from litestar.di import NamedDependency

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tellback_server.asgi import create_app
from tellback_server.cli import freeze_startup_heap, uvicorn_config
from tellback_server.domain.conversations.schemas import ConversationCreate
from tellback_server.http.deps import CLIENT, CLIENT_AUTH, ClientPrincipal
from tellback_server.http.idempotency import IdempotencyKeyHeader, json_response
from tellback_server.logging import configure_logging
from tellback_server.plugins import build_registry
from tellback_server.settings import load_settings, resolve_secret_key
from tests.bench.ceiling_app import _out


@post(
    "/floor/conversations",
    status_code=201,
    middleware=CLIENT_AUTH,
    dependencies=CLIENT,
    include_in_schema=False,
)
async def floor(
    request: Request[Any, Any, Any],
    client: NamedDependency[ClientPrincipal],
    data: ConversationCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response[bytes]:
    return json_response(_out(data), 201)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings, _ = resolve_secret_key(load_settings())
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, registry=build_registry(()), run_worker=False)
    app.register(floor)
    freeze_startup_heap()
    uvicorn.Server(uvicorn_config(app, "127.0.0.1", args.port)).run()


if __name__ == "__main__":
    main()
