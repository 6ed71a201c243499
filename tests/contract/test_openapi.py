"""The committed sdk-spec/openapi.json is exactly what the server generates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_openapi_matches_the_server() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "tellback_server", "openapi"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    committed = (ROOT / "sdk-spec" / "openapi.json").read_text()
    assert json.loads(generated) == json.loads(committed), (
        "sdk-spec/openapi.json is stale: run `uv run tellback openapi > sdk-spec/openapi.json`"
    )


def test_every_operation_documents_its_security() -> None:
    doc = json.loads((ROOT / "sdk-spec" / "openapi.json").read_text())
    public = {"/healthz", "/readyz", "/metrics", "/v1/client/sessions"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path in public:
                continue
            assert op.get("security"), f"{method.upper()} {path} names no security scheme"
