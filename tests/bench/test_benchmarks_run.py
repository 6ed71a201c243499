"""Every benchmark script runs to its end, at sizes that prove only that.

The figures take minutes on a quiet machine (README, "Benchmarks"); this keeps the
scripts from rotting between those runs. The twenty-first session made the local
store's PUT take bytes only for a pending upload, and the upload benchmark's
baseline URL, signed for a key no upload had, was refused from then until the
twenty-second session ran the benchmark again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY = {
    "ingest": ["--seconds", "0.5", "--warmup", "0.2", "--connections", "4"],
    "events": ["--streams", "20", "--replies", "10"],
    "push": ["--devices", "50", "--replies", "10", "--team", "5", "--backlog", "20"],
    "upload": ["--size-mib", "20"],
}


@pytest.mark.parametrize("name", list(TINY))
def test_benchmark_runs_to_its_table(name: str, tmp_path: Path) -> None:
    if name == "upload" and shutil.which("curl") is None:
        pytest.fail("the upload benchmark's baseline is curl (apt-get install curl)")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(HERE / f"bench_{name}.py"), *TINY[name], "--report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(report.read_text())
    assert rows, done.stdout[-3000:]
    assert all(row["bench"] == name and row["value"] for row in rows), rows
