"""Ingest and read benchmark: Tellback against the framework ceiling, side by side.

    uv run python tests/bench/bench_ingest.py [--seconds 10] [--connections 32]
        [--database sqlite|postgresql|both] [--processes 1,2] [--client asyncio|wrk]

Ingest: `POST /v1/client/conversations` with a realistic 1 KiB device/app
context, session auth and a fresh `Idempotency-Key` per request, against a bare
Litestar endpoint (`tests/bench/ceiling_app.py`) that decodes the same JSON into
the same msgspec types and answers the same shape: the most any Litestar app
can do here. Between the two, the ingest floor (`tests/bench/floor_app.py`):
Tellback's own app with one more route declared like the real one (middleware,
session authentication, dependencies, body type) whose handler stores nothing and
answers a fixed conversation: what is left for the handler's own work. And the
issue's naive prototype (`tests/bench/naive_app.py`: ORM inserts of conversation,
message and job, nothing else), the reference its targets were set beside. Reads:
the conversation list and a message page (an end user's), and an agent's inbox
page (agent token auth; the console reloads it on every event), each against the
ceiling's GET that returns a page of the same size and shape, after an ANALYZE
on PostgreSQL (as autovacuum would run within a minute of the ingest: see
:func:`analyze`). Same uvicorn settings, same load.

Load generator: an asyncio HTTP/1.1 keep-alive client over raw sockets
(`--connections` concurrent, one end user per connection), in this process,
or with `--client wrk` Debian's wrk (one thread) sending the same requests;
either shares the machine's CPUs with the server, which is printed with the
results. Each run warms up, then measures `--seconds`; printed: requests/s,
p50/p99 latency, the ratio to the ceiling measured in the same run, and the
server processes' CPU time per request (from /proc: less noisy than requests/s
when comparing changes, since it does not depend on what else the CPUs ran),
and on PostgreSQL PostgreSQL's own ("pg cpu": its server process and every
process it started, from /proc too), which shares the same two CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tellback_server.jobs.worker import asyncpg_dsn  # noqa: E402
from tests.bench import report  # noqa: E402
from tests.bench.bench_push import _embedded_postgres, pct, postmaster_pid  # noqa: E402
from tests.bench.bench_upload import free_port  # noqa: E402

CONTEXT = {
    "app": {"version": "4.12.0", "build": "41200", "bundle_id": "com.example.shop", "env": "prod"},
    "device": {
        "platform": "ios",
        "model": "iPhone15,2",
        "os_version": "18.1.1",
        "locale": "de_DE",
        "timezone": "Europe/Berlin",
        "screen": {"width": 1179, "height": 2556, "scale": 3},
        "memory_mb": 5734,
        "jailbroken": False,
    },
    "network": {"type": "wifi", "carrier": "Telekom.de", "ip_version": 6, "vpn": False},
    "battery": {"level": 0.54, "charging": False, "low_power_mode": False},
    "storage": {"free_mb": 20480, "total_mb": 131072},
    "extra": {
        "screen_name": "CheckoutViewController",
        "cart_items": 3,
        "experiment_flags": ["new_checkout_v2", "dark_mode_auto", "reorder_button"],
        "last_actions": [f"tap:button.{i}" for i in range(12)],
    },
}


def feedback_body() -> bytes:
    return json.dumps(
        {
            "body": "The checkout button does nothing after I change the address. " * 2,
            "subject": "Checkout stuck",
            "tags": ["checkout", "ios"],
            "context": CONTEXT,
            "location": {"latitude": 52.52, "longitude": 13.405, "accuracy_m": 35.0},
        }
    ).encode()


def env_for(workdir: Path, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELLBACK_")}
    env.update(
        TELLBACK_DATA_DIR=str(workdir),
        TELLBACK_SECRET_KEY="bench-secret-key-0123456789abcdef0123",
        TELLBACK_LOG_LEVEL="warning",
        TELLBACK_LOG_FORMAT="json",
    )
    if database_url:
        env["TELLBACK_DATABASE_URL"] = database_url
    return env


async def _wait_ready(url: str) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(300):
            try:
                if (await http.get(f"{url}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


PIDS: dict[str, int] = {}  # server url -> its process id
POSTMASTER: list[int] = []  # the benchmark's PostgreSQL server process, when there is one


def cpu_seconds(url: str) -> float:
    """CPU time (user + system, all threads) the process serving ``url`` has used so far."""
    fields = Path(f"/proc/{PIDS[url]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float | None:
    """CPU time PostgreSQL has used so far: its server process, the live processes it
    started (a backend per connection, the WAL writer, ...) and those it has reaped,
    each of those counted whole (a connection opened and closed while one measures
    counts its whole life). None without PostgreSQL."""
    if not POSTMASTER:
        return None
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile: the postmaster's reaped total has it
            continue
        pid, parent = int(entry.name), int(fields[1])
        if pid == POSTMASTER[0]:
            ticks += sum(int(f) for f in fields[11:15])  # its own and its reaped children's
        elif parent == POSTMASTER[0]:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _cpu_now(url: str) -> tuple[float, float | None]:
    return cpu_seconds(url), postgres_cpu_seconds()


def _cpu_since(url: str, began: tuple[float, float | None]) -> tuple[float, float | None]:
    now = _cpu_now(url)
    database = None if now[1] is None or began[1] is None else now[1] - began[1]
    return now[0] - began[0], database


@asynccontextmanager
async def process(args: list[str], env: dict[str, str], port: int) -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    PIDS[url] = proc.pid
    try:
        await _wait_ready(url)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


def serve_args(port: int) -> list[str]:
    # The one-command default: the job worker runs in the server process too.
    return [sys.executable, "-m", "tellback_server", "serve", "--migrate", "--port", str(port)]


def ceiling_args(port: int) -> list[str]:
    return [sys.executable, str(ROOT / "tests/bench/ceiling_app.py"), "--port", str(port)]


def floor_args(port: int) -> list[str]:
    return [sys.executable, str(ROOT / "tests/bench/floor_app.py"), "--port", str(port)]


def naive_args(port: int) -> list[str]:
    return [sys.executable, str(ROOT / "tests/bench/naive_app.py"), "--port", str(port)]


@dataclass
class Result:
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int
    cpu_seconds: float  # the server process's CPU time over the measured window
    percentiles: dict[int, float] | None = None  # wrk reports these, not each latency
    database_cpu_seconds: float | None = None  # PostgreSQL's, over the same window

    @property
    def database_cpu_ms_per_request(self) -> float | None:
        if self.database_cpu_seconds is None:
            return None
        return self.database_cpu_seconds * 1000 / max(self.requests, 1)

    def pct(self, q: int) -> float:
        return self.percentiles[q] if self.percentiles is not None else pct(self.latencies_ms, q)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_seconds * 1000 / max(self.requests, 1)


class Conn:
    """One keep-alive HTTP/1.1 connection; just enough protocol for this benchmark."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Conn:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def request(self, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in {b"\r\n", b""}:
                break
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        self.writer.close()


Request = Callable[[int], tuple[bytes, bytes]]  # connection index -> (head, body)


async def load(url: str, make: Request, connections: int, seconds: float, warmup: float) -> Result:
    conns = [await Conn.open(url) for _ in range(connections)]
    latencies: list[float] = []
    count = errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def worker(i: int) -> None:
        nonlocal count, errors
        conn = conns[i]
        while True:
            began = time.perf_counter()
            if began >= stop_at:
                return
            head, body = make(i)
            status, _ = await conn.request(head, body)
            done = time.perf_counter()
            if began >= measure_from:
                count += 1
                latencies.append((done - began) * 1000)
                if status >= 400:
                    errors += 1

    async def cpu_over_window() -> tuple[float, float | None]:
        await asyncio.sleep(measure_from - time.perf_counter())
        began = _cpu_now(url)
        await asyncio.sleep(stop_at - time.perf_counter())
        return _cpu_since(url, began)

    cpu = asyncio.ensure_future(cpu_over_window())
    await asyncio.gather(*(worker(i) for i in range(connections)))
    for c in conns:
        c.close()
    server_cpu, database_cpu = await cpu
    return Result(count, seconds, latencies, errors, server_cpu, None, database_cpu)


# --client wrk: Debian's wrk (one thread) replays the same requests the asyncio client
# would send. Its Lua script rotates through one request per connection index (the same
# heads and bodies, so the same session tokens) and gives each a fresh Idempotency-Key.
_KEY = re.compile(rb"(Idempotency-Key: )[0-9a-f]{32}")
_PLACEHOLDER = "@" * 32
_WRK_SCRIPT = """
local templates = {%(templates)s}
local n = 0
function request()
  n = n + 1
  local r = templates[(n %% #templates) + 1]
  return (string.gsub(r, "%(placeholder)s", string.format("%(prefix)s%%016x", n)))
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _lua_string(raw: bytes) -> str:
    safe = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_.:/@,{}[]"
    return '"' + "".join(chr(c) if c in safe else f"\\{c:03d}" for c in raw) + '"'


async def load_wrk(
    url: str, make: Request, connections: int, seconds: float, warmup: float
) -> Result:
    """The same load as :func:`load`, generated by wrk (``apt-get install wrk``)."""
    templates = []
    for i in range(connections):
        head, body = make(i)
        templates.append(_lua_string(_KEY.sub(rb"\1" + _PLACEHOLDER.encode(), head) + body))

    async def run(duration: float) -> dict[str, int]:
        script = _WRK_SCRIPT % {
            "templates": ",".join(templates),
            "placeholder": _PLACEHOLDER,
            "prefix": uuid.uuid4().hex[:16],  # fresh keys for every run
        }
        with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
            f.write(script)
            f.flush()
            wrk = await asyncio.create_subprocess_exec(
                # wrk takes whole seconds; the rate comes from the duration it reports.
                *("wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s"),
                *("--timeout", "10s"),
                *("-s", f.name, url),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            out, _ = await wrk.communicate()
        lines = [line for line in out.decode().splitlines() if line.startswith('{"requests"')]
        if wrk.returncode != 0 or not lines:
            raise RuntimeError(f"wrk failed: {out.decode()}")
        figures: dict[str, int] = json.loads(lines[-1])
        return figures

    if warmup > 0:
        await run(warmup)
    began = _cpu_now(url)
    figures = await run(seconds)
    cpu, database_cpu = _cpu_since(url, began)
    return Result(
        figures["requests"],
        figures["duration_us"] / 1e6,
        [],
        figures["errors"],
        cpu,
        {50: figures["p50_us"] / 1000, 99: figures["p99_us"] / 1000},
        database_cpu,
    )


def _load_with(args: argparse.Namespace) -> Callable[..., Awaitable[Result]]:
    """:func:`load`, or :func:`load_wrk` for ``--client wrk``."""
    return load_wrk if args.client == "wrk" else load


def post_head(path: str, host: str, length: int, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def get_head(path: str, host: str, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


class Setup(NamedTuple):
    tokens: list[str]  # one end user's session each
    conv_id: str  # the first user's conversation with 25 messages
    agent_token: str  # an agent of the app, whose inbox holds the 30 conversations


async def setup(url: str, env: dict[str, str], connections: int) -> Setup:
    out = subprocess.run(  # noqa: ASYNC221 (setup, before anything is measured)
        [sys.executable, "-m", "tellback_server", "admin", "create-token"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    admin = {"Authorization": f"Bearer {out.strip().splitlines()[-1]}"}
    unlimited = {"rate_limits": {"app_per_minute": 0, "user_per_minute": 0}}  # 0: off
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.post(
            "/v1/admin/apps", json={"name": "Bench", "settings": unlimited}, headers=admin
        )
        r.raise_for_status()
        app = r.json()
        tokens = []
        for _ in range(connections):
            s = await http.post(
                "/v1/client/sessions",
                json={"app_key": app["app_key"], "installation_id": uuid.uuid4().hex},
            )
            s.raise_for_status()
            tokens.append(s.json()["session_token"])
        # Something to read: a few conversations with messages for the first user.
        user = {"Authorization": f"Bearer {tokens[0]}"}
        conv_id = ""
        for _ in range(30):
            r = await http.post("/v1/client/conversations", content=feedback_body(), headers=user)
            r.raise_for_status()
            conv_id = r.json()["id"]
        for i in range(24):
            r = await http.post(
                f"/v1/client/conversations/{conv_id}/messages",
                json={"body": f"more detail {i}"},
                headers=user,
            )
            r.raise_for_status()
        r = await http.post(
            "/v1/admin/agents",
            json={"name": "Bench agent", "email": "agent@example.com", "app_ids": [app["id"]]},
            headers=admin,
        )
        r.raise_for_status()
    return Setup(tokens, conv_id, r.json()["token"])


def report_row(name: str, ours: Result, ceiling: Result) -> report.Row:
    database = ours.database_cpu_ms_per_request
    return (
        name,
        "req/s vs framework ceiling; p50, p99; server CPU per request"
        + ("" if database is None else " (PostgreSQL's)"),
        f"{ours.rps:.0f} vs {ceiling.rps:.0f} = {ours.rps / ceiling.rps:.3f}; "
        f"{ours.pct(50):.1f} ms, {ours.pct(99):.1f} ms; "
        f"{ours.cpu_ms_per_request:.2f} ms vs {ceiling.cpu_ms_per_request:.2f} ms"
        + ("" if database is None else f" ({database:.2f} ms)"),
    )


def row(name: str, ours: Result, ceiling: Result) -> str:
    database = ours.database_cpu_ms_per_request
    return (
        f"{name:<34} {ours.rps:>8.0f} {ceiling.rps:>8.0f} {ours.rps / ceiling.rps:>6.3f} "
        f"{ours.pct(50):>7.1f} {ours.pct(99):>7.1f} "
        f"{ceiling.pct(99):>7.1f} {ours.cpu_ms_per_request:>7.2f} "
        f"{ceiling.cpu_ms_per_request:>7.2f} "
        f"{'' if database is None else f'{database:.2f}':>7} {ours.errors:>5}"
    )


async def run_database(
    name: str, base: Path, database_url: str | None, args: argparse.Namespace, processes: int
) -> list[tuple[str, Result, Result]]:
    lines: list[tuple[str, Result, Result]] = []
    run = _load_with(args)
    env = env_for(base / f"{name}-{processes}", database_url)
    ports = [free_port() for _ in range(processes)]
    ceiling_port, floor_port, naive_port = free_port(), free_port(), free_port()
    async with AsyncExitStack() as stack:
        started = [  # the servers migrate the database first
            await stack.enter_async_context(m)
            for m in [process(serve_args(p), env, p) for p in ports]
            + [process(ceiling_args(ceiling_port), env, ceiling_port)]
            + [process(floor_args(floor_port), env, floor_port)]
        ]
        *ours, ceiling, floor = started
        tokens, conv_id, agent_token = await setup(ours[0], env, args.connections)
        naive = None
        if processes == 1:  # it writes for an end user: it starts once setup made them
            naive_server = process(naive_args(naive_port), env, naive_port)
            naive = await stack.enter_async_context(naive_server)
        body = feedback_body()
        host = "127.0.0.1"

        def ingest(i: int) -> tuple[bytes, bytes]:
            headers = {
                "Authorization": f"Bearer {tokens[i]}",
                "Idempotency-Key": uuid.uuid4().hex,
            }
            return post_head("/v1/client/conversations", host, len(body), headers), body

        def floor_ingest(i: int) -> tuple[bytes, bytes]:
            headers = {"Authorization": f"Bearer {tokens[i]}", "Idempotency-Key": uuid.uuid4().hex}
            return post_head("/floor/conversations", host, len(body), headers), body

        def naive_ingest(_: int) -> tuple[bytes, bytes]:
            return post_head("/naive/conversations", host, len(body), {}), body

        def ceiling_ingest(i: int) -> tuple[bytes, bytes]:
            headers = {"Authorization": f"Bearer {tokens[i]}", "Idempotency-Key": uuid.uuid4().hex}
            return post_head("/ceiling/conversations", host, len(body), headers), body

        reader = {"Authorization": f"Bearer {tokens[0]}"}

        def list_convs(_: int) -> tuple[bytes, bytes]:
            return get_head("/v1/client/conversations?limit=25", host, reader), b""

        def list_msgs(_: int) -> tuple[bytes, bytes]:
            path = f"/v1/client/conversations/{conv_id}/messages?limit=25"
            return get_head(path, host, reader), b""

        def ceiling_list(_: int) -> tuple[bytes, bytes]:
            return get_head("/ceiling/conversations?limit=25", host, reader), b""

        agent = {"Authorization": f"Bearer {agent_token}"}

        def inbox(_: int) -> tuple[bytes, bytes]:
            return get_head("/v1/agent/conversations?limit=25", host, agent), b""

        def ceiling_inbox(_: int) -> tuple[bytes, bytes]:
            return get_head("/ceiling/agent/conversations?limit=25", host, agent), b""

        label = f"{name}, {processes} process{'es' if processes > 1 else ''}"
        for title, ours_req, ceiling_req in (
            ("ingest", ingest, ceiling_ingest),
            ("conversation list", list_convs, ceiling_list),
            ("message page", list_msgs, ceiling_list),
            ("agent inbox", inbox, ceiling_inbox),
        ):
            if not (args.reads if title != "ingest" else args.ingest):
                continue
            if title == "conversation list":
                await analyze(database_url)
            ceiling_result = await run(
                ceiling, ceiling_req, args.connections, args.seconds, args.warmup
            )
            ours_result = await _spread(ours, ours_req, args)
            lines.append((f"{label}: {title}", ours_result, ceiling_result))
            if title == "ingest" and processes == 1:
                # The same route's framework, authentication and decoding, with no handler work.
                floor_result = await run(
                    floor, floor_ingest, args.connections, args.seconds, args.warmup
                )
                lines.append((f"{label}: ingest floor", floor_result, ceiling_result))
            if title == "ingest" and naive is not None:
                # The reference: ORM inserts of the three rows, nothing else.
                naive_result = await run(
                    naive, naive_ingest, args.connections, args.seconds, args.warmup
                )
                lines.append((f"{label}: naive prototype", naive_result, ceiling_result))
    return lines


async def analyze(database_url: str | None) -> None:
    """PostgreSQL: ANALYZE, as autovacuum does within about a minute of a burst of
    writes, so that the reads measure the steady state. Right after the ingest's ten
    thousand inserts into tables that were nearly empty, each backend still holds the
    plans it made for those (the tables never analyzed yet): the conversation list read
    ~2,600 buffers per request (a scan of the whole table) where the plan made from
    statistics reads ~150, about 1.8 ms of PostgreSQL's CPU per list instead of 0.5 ms.
    Whether autovacuum had run before the list decided that figure."""
    if database_url is None:
        return
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


async def _spread(urls: list[str], make: Request, args: argparse.Namespace) -> Result:
    """Split the connections over the server processes (a load balancer's job)."""
    per = args.connections // len(urls)
    run = _load_with(args)

    def shifted(k: int) -> Request:
        return lambda i: make(k * per + i)

    results = await asyncio.gather(
        *(run(url, shifted(k), per, args.seconds, args.warmup) for k, url in enumerate(urls))
    )
    if len(results) == 1:
        return results[0]
    databases = [r.database_cpu_seconds for r in results if r.database_cpu_seconds is not None]
    percentiles = None
    if results[0].percentiles is not None:  # wrk's, per process: the slower one's (a bound)
        percentiles = {q: max(r.pct(q) for r in results) for q in results[0].percentiles}
    return Result(
        sum(r.requests for r in results),
        max(r.seconds for r in results),
        [lat for r in results for lat in r.latencies_ms],
        sum(r.errors for r in results),
        sum(r.cpu_seconds for r in results),
        percentiles,
        # Every process's load measured the one PostgreSQL over about the same window.
        max(databases) if databases else None,
    )


async def main_async(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="tellback-bench-ingest-"))
    lines: list[tuple[str, Result, Result]] = []
    try:
        if args.database in {"sqlite", "both"}:
            lines += await run_database("sqlite", base, None, args, 1)
        if args.database in {"postgresql", "both"}:
            pg = _embedded_postgres(base)
            if pg is None:
                print("embedded-postgres is not installed: skipping PostgreSQL")
            else:
                url, server = pg
                POSTMASTER[:] = [postmaster_pid(server)]
                try:
                    for n in args.processes:
                        lines += await run_database("postgresql", base, url, args, n)
                finally:
                    POSTMASTER.clear()
                    server.cleanup()
        print(
            f"\n{args.connections} connections, {args.seconds:g} s per run after "
            f"{args.warmup:g} s warm-up, "
            f"{'wrk (one thread)' if args.client == 'wrk' else 'asyncio raw-socket client'} "
            "on the same machine "
            f"({os.cpu_count()} CPUs)"
        )
        print(
            f"{'':<34} {'req/s':>8} {'ceiling':>8} {'ratio':>6} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'ceil p99':>7} {'cpu ms':>7} {'ceil cpu':>7} {'pg cpu':>7} "
            f"{'4xx+':>5}"
        )
        for line in lines:
            print(row(*line))
        report.write(args.report, "ingest", [report_row(*line) for line in lines])
        failed = [name for name, ours, ceiling in lines if ours.errors or ceiling.errors]
        if failed:  # a run whose requests failed measured something else
            sys.exit(f"requests failed (4xx+ above) in: {', '.join(failed)}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument(
        "--processes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2]
    )
    parser.add_argument("--no-reads", dest="reads", action="store_false")
    parser.add_argument(
        "--no-ingest", dest="ingest", action="store_false", help="the reads alone (faster)"
    )
    parser.add_argument(
        "--client",
        choices=["asyncio", "wrk"],
        default="asyncio",
        help="load generator: this script's asyncio client, or wrk (apt-get install wrk)",
    )
    parser.add_argument("--report", help="also write the figures here (python -m tests.bench)")
    args = parser.parse_args()
    if args.client == "wrk" and shutil.which("wrk") is None:
        sys.exit("--client wrk needs wrk on the PATH (Debian: apt-get install wrk)")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
