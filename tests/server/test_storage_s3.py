"""The S3 store as an operator meets it when storage misbehaves: how long a call
waits on a stalled server, and what an error says."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tellback_server.jobs.registry import JobRegistry
from tellback_server.storage import s3
from tellback_server.storage.base import StorageError
from tests.server.conftest import make_settings, s3_settings, serve_app


@contextlib.contextmanager
def stalled_endpoint() -> Iterator[str]:
    """An endpoint that takes connections and never answers, as a stopped S3 server
    (``kill -STOP``) does: the kernel completes the handshakes, nothing reads."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


async def test_metadata_calls_give_up_on_a_stalled_storage_after_one_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request's metadata calls (stat, list, delete...) waited 60 s for an answer,
    three times. They have a read timeout of their own (10 s; shortened here) and
    retry a read once."""
    monkeypatch.setattr(s3, "METADATA_READ_S", 0.5)
    with stalled_endpoint() as endpoint:
        store = s3.S3Store(s3_settings(endpoint))
        started = time.monotonic()
        with pytest.raises(StorageError):
            await store.stat("some/key")
        elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3, elapsed  # two reads of 0.5 s, not three


async def test_a_stalled_storage_holds_neither_the_default_threads_nor_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every storage call ran in asyncio's default pool (``cpu_count + 4`` threads):
    a few calls stalled on storage held it, so a DNS lookup (a webhook, APNs) or any
    other ``to_thread`` waited for their timeout, and the readiness probe, which
    answers within 2 s, queued behind them."""
    monkeypatch.setattr(s3, "METADATA_READ_S", 4.0)
    with stalled_endpoint() as endpoint:
        store = s3.S3Store(s3_settings(endpoint))
        stalled = [asyncio.create_task(store.stat(f"k{i}")) for i in range(16)]
        await asyncio.sleep(0.3)  # every call is in its thread, waiting for an answer
        started = time.monotonic()
        await asyncio.to_thread(lambda: None)
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        with pytest.raises(StorageError):
            await store.ping()
        assert time.monotonic() - started < s3.PING_S + 1.0
        for task in stalled:
            with pytest.raises(StorageError):
                await task


async def test_a_start_on_a_stalled_storage_waits_for_the_probe_alone(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """The start's bucket check went through the metadata client: two reads of 10 s
    on a stalled storage before `serve` answered anything."""
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    with stalled_endpoint() as endpoint:
        settings = make_settings(
            f"sqlite+aiosqlite:///{db}", tmp_path / "data", s3=s3_settings(endpoint)
        )
        started = time.monotonic()
        with capture_logs() as logs:
            async with serve_app(settings, JobRegistry()):
                elapsed = time.monotonic() - started
    assert elapsed < s3.PING_S + 2.0, elapsed
    [line] = [e for e in logs if e["event"] == "storage.not_ready"]
    assert f"cannot reach {endpoint}" in line["error"], line


def _refused_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed: nothing listens there


@pytest.mark.parametrize("call", ["ping", "stat"])
async def test_a_refused_connection_says_so_with_the_address(call: str) -> None:
    """Both a refused port and the wrong TLS setting said only `MaxRetryError`."""
    endpoint = _refused_endpoint()
    store = s3.S3Store(s3_settings(endpoint))
    with pytest.raises(StorageError) as caught:
        await (store.ping() if call == "ping" else store.stat("some/key"))
    assert str(caught.value) == (
        f"object storage unavailable: cannot reach {endpoint}: connection refused"
    )


@pytest.mark.parametrize("call", ["ping", "stat"])
async def test_tls_to_a_plain_http_storage_names_the_setting(s3_endpoint: str, call: str) -> None:
    store = s3.S3Store(replace(s3_settings(s3_endpoint), secure=True))
    with pytest.raises(StorageError) as caught:
        await (store.ping() if call == "ping" else store.stat("some/key"))
    assert str(caught.value) == (
        f"object storage unavailable: cannot reach {s3_endpoint}: TLS handshake failed: "
        "WRONG_VERSION_NUMBER (is TELLBACK_S3_SECURE right?)"
    )


async def test_serve_says_storage_is_not_ready_in_one_line(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """`serve` logged `storage.not_ready` with a traceback of some sixty lines; the
    worker, one line. Both say it in one line now."""
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    endpoint = _refused_endpoint()
    settings = make_settings(
        f"sqlite+aiosqlite:///{db}", tmp_path / "data", s3=s3_settings(endpoint)
    )
    with capture_logs() as logs:
        async with serve_app(settings, JobRegistry()):
            pass
    [line] = [e for e in logs if e["event"] == "storage.not_ready"]
    assert "exc_info" not in line, line
    assert line["error"].endswith(f"cannot reach {endpoint}: connection refused"), line
