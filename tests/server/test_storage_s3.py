"""The S3 store as an operator meets it when storage misbehaves: how long a call
waits on a stalled server, and what an error says."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from tellback_server.storage import s3
from tellback_server.storage.base import StorageError
from tests.server.conftest import s3_settings


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
