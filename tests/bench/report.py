"""Rows a benchmark script hands to the `python -m tests.bench` table (``--report PATH``)."""

from __future__ import annotations

import json
from pathlib import Path

Row = tuple[str, str, str]  # (case, measure, value as printed)


def write(path: str | None, bench: str, rows: list[Row]) -> None:
    if path:
        Path(path).write_text(
            json.dumps([{"bench": bench, "case": c, "measure": m, "value": v} for c, m, v in rows])
        )
