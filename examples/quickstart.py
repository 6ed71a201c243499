"""Walk the whole feedback loop against a running server.

Run `uv run tellback serve` in one terminal, then:

    TELLBACK_ADMIN_TOKEN=tba_... uv run python examples/quickstart.py

As the operator (admin API, httpx) it creates an app and an agent. As the end
user it uses the Python SDK: it opens the live event stream, then sends
feedback with a photo (a small PNG made on the fly) and a location. As the
agent (agent API, httpx) it answers; the user receives the reply through
`events.stream()` and finally reads the unread badge count.
TELLBACK_URL overrides the server address (default http://127.0.0.1:8080).
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import uuid
import zlib
from pathlib import Path

import httpx

from tellback_sdk import Client, DeviceInfo, Location, MessageCreated, Reset


def tiny_png(width: int = 32, height: int = 24) -> bytes:
    """A valid RGB PNG (a blue gradient), made with the standard library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + b"".join(bytes((10, 120, 8 * x % 256)) for x in range(width))
        for _ in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def main() -> int:
    base = os.environ.get("TELLBACK_URL", "http://127.0.0.1:8080")
    admin_token = os.environ.get("TELLBACK_ADMIN_TOKEN")
    if not admin_token:
        print("set TELLBACK_ADMIN_TOKEN to the token `tellback serve` printed", file=sys.stderr)
        return 2
    admin = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=base, timeout=10) as http, tempfile.TemporaryDirectory() as tmp:
        # --- the operator: an app and an agent ---------------------------------------------
        r = http.post("/v1/admin/apps", json={"name": "Quickstart"}, headers=admin)
        r.raise_for_status()
        app = r.json()
        r = http.post(
            "/v1/admin/agents", json={"name": "Ada", "app_ids": [app["id"]]}, headers=admin
        )
        r.raise_for_status()
        agent = {"Authorization": f"Bearer {r.json()['token']}"}

        # --- the end user, through the SDK ----------------------------------------------------
        photo = Path(tmp) / "screenshot.png"
        photo.write_bytes(tiny_png())
        device = DeviceInfo(platform="ios", model="iPhone16,1", os_version="18.2")
        with Client(base, app["app_key"], data_dir=Path(tmp) / "sdk", device=device) as tb:
            # Open the stream first: nothing that happens from here on can be missed.
            with tb.events.stream() as events:
                events.connect()
                conv = tb.conversations.create(
                    "The checkout button does nothing",
                    attachments=[photo],
                    location=Location(latitude=52.52, longitude=13.405, accuracy_m=15),
                    context={"app": {"version": "2.3.1"}, "network": {"type": "wifi"}},
                )
                print("feedback sent:", conv.id, "with", photo.name)

                # --- the agent answers (agent API) -----------------------------------------
                r = http.post(
                    f"/v1/agent/conversations/{conv.id}/messages",
                    json={"body": "Thanks! Fixed in 2.3.2."},
                    headers={**agent, "Idempotency-Key": str(uuid.uuid4())},
                )
                r.raise_for_status()

                # --- the user sees the reply arrive live -------------------------------------
                for event in events:
                    if isinstance(event, Reset):
                        print("stream reset:", event.reason)
                    elif (
                        isinstance(event, MessageCreated)
                        and event.message.author.type == "agent"
                        and event.conversation.id == conv.id
                    ):
                        print(f"agent replied (live, event {event.id}):", event.message.body)
                        break
            print("badge:", tb.me.unread_count())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
