"""Every benchmark, one after the other, and one table of their figures.

    uv run python -m tests.bench [--quick] [--only ingest,events,push,upload]

Each benchmark runs as its own process (its servers start and stop with it) and
prints its full table as it goes; at the end this prints the figures of all of
them together. `--quick` shortens every run (smaller uploads, fewer replies and
streams, 5 s load runs): fine for a look, noisier than the defaults the README's
figures come from. See each `tests/bench/bench_*.py` for what it measures and how.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

BENCHES: dict[str, tuple[list[str], list[str]]] = {
    # name: (default arguments, --quick arguments)
    "ingest": ([], ["--seconds", "5", "--warmup", "1"]),
    "events": ([], ["--streams", "300", "--replies", "60"]),
    "push": ([], ["--devices", "1000", "--replies", "60", "--team", "30", "--backlog", "300"]),
    "upload": ([], ["--size-mib", "64"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(BENCHES))
    args = parser.parse_args()
    rows: list[dict[str, str]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tellback-bench-report-") as tmp:
        for name in args.only.split(","):
            full, quick = BENCHES[name]
            report = Path(tmp) / f"{name}.json"
            command = [
                sys.executable,
                str(HERE / f"bench_{name}.py"),
                *(quick if args.quick else full),
                "--report",
                str(report),
            ]
            print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
            began = time.monotonic()
            if (
                subprocess.run(command, cwd=ROOT, check=False).returncode != 0
                or not report.exists()
            ):
                failed.append(name)
                continue
            rows += json.loads(report.read_text())
            print(f"=== {name}: {time.monotonic() - began:.0f} s", flush=True)
    print(
        f"\nTellback benchmarks on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}{' (--quick)' if args.quick else ''}"
    )
    widths = [max([len(h)] + [len(r[k]) for r in rows]) for h, k in _COLUMNS]
    print("  ".join(h.ljust(w) for (h, _), w in zip(_COLUMNS, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(r[k].ljust(w) for (_, k), w in zip(_COLUMNS, widths, strict=True)))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


_COLUMNS = [("bench", "bench"), ("case", "case"), ("measure", "measure"), ("value", "value")]


if __name__ == "__main__":
    main()
