"""A phone that loses its network: feedback is queued, survives a "restart", and is
sent once the network is back — exactly once, in order, with its photo.

Run `uv run tellback serve` in one terminal, then:

    TELLBACK_ADMIN_TOKEN=tba_... uv run python examples/mobile_simulation.py

(or set TELLBACK_APP_KEY to use an existing app instead of creating one).
"""

from __future__ import annotations

import base64
import os
import sys
import tempfile
from pathlib import Path

import httpx

from tellback_sdk import DeviceInfo, MobileClient

# A 1x1 PNG, so the example needs no image library.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


class Radio(httpx.BaseTransport):
    """The phone's network: requests fail like a dead connection while offline."""

    def __init__(self) -> None:
        self.online = True
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.online:
            raise httpx.ConnectError("airplane mode", request=request)
        return self._inner.handle_request(request)


def app_key(base: str) -> str | None:
    if key := os.environ.get("TELLBACK_APP_KEY"):
        return key
    admin = os.environ.get("TELLBACK_ADMIN_TOKEN")
    if not admin:
        return None
    r = httpx.post(
        f"{base}/v1/admin/apps",
        json={"name": "Mobile simulation"},
        headers={"Authorization": f"Bearer {admin}"},
    )
    r.raise_for_status()
    created: str = r.json()["app_key"]
    return created


def main() -> int:
    base = os.environ.get("TELLBACK_URL", "http://127.0.0.1:8080")
    key = app_key(base)
    if key is None:
        print("set TELLBACK_ADMIN_TOKEN (or TELLBACK_APP_KEY)", file=sys.stderr)
        return 2
    data_dir = Path(tempfile.mkdtemp(prefix="tellback-phone-"))
    device = DeviceInfo(platform="ios", model="iPhone16,1", os_version="18.2", app_version="2.3.1")
    radio = Radio()
    # One quick retry keeps the demo snappy; a real app keeps the default policy.
    phone = MobileClient(
        base, key, data_dir=data_dir, device=device, transport=radio, max_retries=1
    )
    phone.me.get()  # online once: the session is created and stored
    radio.online = False
    photo = data_dir / "IMG_0001.png"
    photo.write_bytes(PIXEL)
    conv = phone.conversations.create("The map freezes in the tunnel", attachments=[photo])
    phone.messages.create(conv, "It happened again at the next station")
    photo.unlink()  # the queue keeps its own copy
    result = phone.outbox.flush()
    print(f"offline: sent {result.sent}, still queued {result.pending} ({result.stopped_by})")
    phone.close()  # the app is killed; only data_dir survives

    radio.online = True
    with MobileClient(base, key, data_dir=data_dir, device=device, transport=radio) as phone:
        result = phone.outbox.flush()
        print(f"back online: sent {result.sent}, dead {result.dead}, queued {result.pending}")
        sent = phone.outbox.get(conv.id)
        assert sent is not None
        assert sent.remote_id is not None
        for message in phone.messages.list(sent.remote_id):
            files = len(message.attachments)
            print(
                f"  {message.author.type}: {message.body} ({files} file{'' if files == 1 else 's'})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
