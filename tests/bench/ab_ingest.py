"""Two builds of the server, alternately, under the ingest load: what a change saved.

    uv run python tests/bench/ab_ingest.py --base REV [--database sqlite|postgresql]
        [--pairs 5] [--seconds 6] [--connections 32] [--together]

Absolute figures on a shared VM drift by 15 % or more within an hour, so two
runs far apart compare the hour, not the code. This runs the server of git
revision ``REV`` (its ``server/src``, from ``git archive``) and the working
tree's server one after the other, ``--pairs`` times, swapping which goes first
in every other pair, each in a fresh data directory (or a fresh PostgreSQL
database) with the load of ``bench_ingest.py``: ``POST /v1/client/conversations``
with a 1 KiB context, session auth and an ``Idempotency-Key``, from its asyncio
raw-socket client. Per run it prints the server process's CPU time per request
(from /proc: what the code costs, less sensitive to what else the CPUs ran than
requests/s), requests/s and p99; at the end the change per pair and its median.

On PostgreSQL, alternate runs also print PostgreSQL's CPU per request.

Even alternating, runs seconds apart can differ by 20 % on a VM. ``--together``
runs both servers at once instead, each under its own ``--connections``, so
both see the same machine at the same moments; the servers and the client then
share the CPUs three ways, so compare the CPU per request, not requests/s (and
read a pair's two orders together: whichever server starts first fares a few
per cent differently). Both then share one PostgreSQL, so a change that saves
PostgreSQL's work or waiting rather than the server's CPU shows little there:
the ninth session's fixed connection pool measured -4 % together (median of
four pairs) and -14 % CPU, +15 to +37 % requests/s alternately.

Both builds run on this checkout's virtual environment: a base whose
dependencies differ is measured with today's packages.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.bench.bench_ingest import (  # noqa: E402
    POSTMASTER,
    Result,
    env_for,
    feedback_body,
    load,
    post_head,
    process,
    serve_args,
    setup,
)
from tests.bench.bench_push import _embedded_postgres, pct, postmaster_pid  # noqa: E402
from tests.bench.bench_upload import free_port  # noqa: E402


@dataclass(frozen=True)
class Build:
    name: str
    source: Path  # the directory holding the ``tellback_server`` package


def export_base(rev: str, into: Path) -> Build:
    """``server/src`` of ``rev``, unpacked under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "server/src"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return Build(f"base {rev}", into / "server" / "src")


@asynccontextmanager
async def serving(
    build: Build, workdir: Path, database_url: str | None, args: argparse.Namespace
) -> AsyncIterator[Callable[[], Awaitable[Result]]]:
    """``build``'s server, set up; yields a function that runs the ingest load on it."""
    env = env_for(workdir, database_url)
    env["PYTHONPATH"] = str(build.source)  # ahead of the editable install's path
    port = free_port()
    async with process(serve_args(port), env, port) as url:
        tokens, *_ = await setup(url, env, args.connections)
        body = feedback_body()

        def ingest(i: int) -> tuple[bytes, bytes]:
            headers = {"Authorization": f"Bearer {tokens[i]}", "Idempotency-Key": uuid.uuid4().hex}
            return post_head("/v1/client/conversations", "127.0.0.1", len(body), headers), body

        yield lambda: load(url, ingest, args.connections, args.seconds, args.warmup)


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tellback-ab-"))
    pg = None
    try:
        builds = (export_base(args.base, tmp / "base"), Build("working tree", ROOT / "server/src"))
        if args.database == "postgresql":
            pg = _embedded_postgres(tmp)
            if pg is None:
                raise SystemExit("embedded-postgres is not installed")
            if not args.together:  # together, both builds' loads share its CPU time
                POSTMASTER[:] = [postmaster_pid(pg[1])]
        cpu: dict[str, list[float]] = {b.name: [] for b in builds}

        def database(run: str) -> str | None:
            if pg is None:
                return None
            pg[1].psql(f"CREATE DATABASE {run}")
            uri: str = pg[1].get_uri(database=run)
            return uri.replace("postgresql://", "postgresql+asyncpg://", 1)

        def report(pair: int, build: Build, result: Result) -> None:
            cpu[build.name].append(result.cpu_ms_per_request * 1000)
            database = result.database_cpu_ms_per_request
            print(
                f"pair {pair + 1} {build.name:<24} {result.cpu_ms_per_request * 1000:>6.0f} "
                f"us CPU/request{'' if database is None else f' ({database * 1000:.0f} pg)'} "
                f"{result.rps:>7.0f} req/s p99 "
                f"{pct(result.latencies_ms, 99):>6.1f} ms errors {result.errors}",
                flush=True,
            )

        for pair in range(args.pairs):
            order = builds if pair % 2 == 0 else builds[::-1]
            runs = [f"run{pair}{'ab'[builds.index(b)]}" for b in order]
            if args.together:  # both at once: the same machine weather for both
                async with AsyncExitStack() as stack:
                    loads = [
                        await stack.enter_async_context(serving(b, tmp / r, database(r), args))
                        for b, r in zip(order, runs, strict=True)
                    ]
                    results = await asyncio.gather(*(run_load() for run_load in loads))
                for build, result in zip(order, results, strict=True):
                    report(pair, build, result)
                continue
            for build, run in zip(order, runs, strict=True):
                async with serving(build, tmp / run, database(run), args) as run_load:
                    report(pair, build, await run_load())
        base, head = (cpu[b.name] for b in builds)
        changes = [(h - b) / b * 100 for b, h in zip(base, head, strict=True)]
        print(f"\n{args.database}, {args.connections} connections, {args.seconds:g} s runs")
        print("server CPU per request, working tree against base, per pair: ", end="")
        print(", ".join(f"{c:+.0f} %" for c in changes))
        print(
            f"median {statistics.median(changes):+.0f} %; base {min(base):.0f}-{max(base):.0f} us, "
            f"working tree {min(head):.0f}-{max(head):.0f} us"
        )
    finally:
        if pg is not None:
            pg[1].cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--together",
        action="store_true",
        help="load both servers at once, each with --connections (less sensitive to drift)",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
