"""A small webhook receiver: verifies Tellback deliveries and prints them.

Standard library HTTP server plus ``tellback_sdk.webhooks.verify`` (the SDK's
``webhooks`` extra: ``pip install 'tellback-sdk[webhooks]'``). It answers 204 to a
delivery whose signature and timestamp check out, 400 to anything else.

Point a webhook at it. The server refuses loopback/private addresses unless the
operator allows them, so start the server with

    TELLBACK_WEBHOOK_ALLOW_PRIVATE=true uv run tellback serve

and register the endpoint (the answer's ``secret`` is shown only once):

    curl -s -X POST http://127.0.0.1:8080/v1/admin/apps/APP_ID/webhooks \\
         -H "Authorization: Bearer tba_..." -H "Content-Type: application/json" \\
         -d '{"url": "http://127.0.0.1:8000/webhooks"}'

then run the receiver with that secret (several ``--secret`` during a rotation):

    TELLBACK_WEBHOOK_SECRET=whsec_... uv run python examples/webhook_receiver.py --port 8000

Deliveries come from the server's job worker (``tellback serve`` runs one unless
``--no-worker``); each one is printed as ``<type> <id> conversation=<id> ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tellback_sdk.webhooks import WebhookEvent, WebhookVerificationError, verify

MAX_BODY = 1 << 20
_lock = threading.RLock()


def say(line: str) -> None:
    """One whole line (``print`` writes the text and its newline separately, so lines
    printed by two threads at once could interleave)."""
    with _lock:
        print(line, flush=True)


def describe(event: WebhookEvent) -> str:
    parts = [event.type, event.id]
    if event.conversation is not None:
        conv = event.conversation
        parts.append(f"conversation={conv.id} status={conv.status}")
        if conv.end_user is not None and conv.end_user.external_id:
            parts.append(f"user={conv.end_user.external_id}")
    if event.message is not None:
        who = "internal note" if event.message.internal else event.message.author.type
        parts.append(f"{who}: {event.message.body or ''!r}")
    return " ".join(parts)


class Receiver(ThreadingHTTPServer):
    def __init__(
        self, address: tuple[str, int], secrets: list[str], path: str, count: int | None
    ) -> None:
        super().__init__(address, Handler)
        self.secrets = secrets
        self.hook_path = path
        self.remaining = count
        self.seen: set[str] = set()  # delivery is at least once: de-duplicate by id


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        if self.path.split("?")[0] != self.server.hook_path:
            self._answer(404, b"not found")
            return
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY:
            self._answer(413, b"too large")
            return
        body = self.rfile.read(length)
        try:
            event = verify(body, dict(self.headers.items()), self.server.secrets)
        except WebhookVerificationError as exc:
            say(f"rejected: {exc}")
            self._answer(400, str(exc).encode())
            return
        with _lock:  # deliveries arrive concurrently, each on a thread of its own
            duplicate = event.id in self.server.seen
            self.server.seen.add(event.id)
            say(("duplicate " if duplicate else "") + describe(event))
            done = False
            if not duplicate and self.server.remaining is not None:
                self.server.remaining -= 1
                done = self.server.remaining <= 0
        self._answer(204, b"")
        if done:
            # shutdown() waits for serve_forever(): call it off this handler's thread.
            threading.Thread(target=self.server.shutdown, daemon=True).start()

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per delivery is printed above


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--path", default="/webhooks")
    p.add_argument(
        "--secret",
        action="append",
        default=[],
        help="whsec_... (repeat during a rotation; default TELLBACK_WEBHOOK_SECRET)",
    )
    p.add_argument("--count", type=int, help="exit after this many verified deliveries")
    args = p.parse_args(argv)
    secrets = args.secret or [
        s for s in os.environ.get("TELLBACK_WEBHOOK_SECRET", "").split(",") if s.strip()
    ]
    if not secrets:
        print("set --secret or TELLBACK_WEBHOOK_SECRET to the endpoint's secret", file=sys.stderr)
        return 2
    server = Receiver((args.host, args.port), secrets, args.path, args.count)
    print(f"listening on http://{args.host}:{server.server_port}{args.path}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
