"""sdk-spec/conformance/run.py passes against a real `tellback serve` process.

This is what a native SDK team runs in CI: an empty data dir (SQLite + local disk),
an admin token from `tellback admin create-token`, the server bound to 127.0.0.1,
then the runner; the server is stopped at the end.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_quickstart import Server, base_env

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    tmp_path = tmp_path_factory.mktemp("conformance")
    env = base_env()
    token = (
        subprocess.run(
            [sys.executable, "-m", "tellback_server", "admin", "create-token"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    srv = Server(tmp_path, env, "--host", "127.0.0.1")
    try:
        srv.wait_ready()
        yield srv, token
    finally:
        code, _, err = srv.stop()
        assert code == 0, err[-2000:]


def test_conformance_runner_passes(server: tuple[Server, str]) -> None:
    srv, token = server
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sdk-spec" / "conformance" / "run.py"),
            "--base-url",
            srv.url,
            "--admin-token",
            token,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "0 failed" in result.stdout
    assert result.stdout.count("PASS") >= 10


def test_conformance_runner_fails_loudly(server: tuple[Server, str]) -> None:
    srv, _ = server
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sdk-spec" / "conformance" / "run.py"),
            "--base-url",
            srv.url,
            "--admin-token",
            "tba_wrong",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "setup failed" in result.stderr
