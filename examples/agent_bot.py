"""A support bot: answers new feedback through the agent API.

The SDK is the end user's SDK, so the bot speaks HTTP with httpx directly; the
agent API is small (list the inbox, reply). Each reply carries an Idempotency-Key
derived from the user message it answers, so a crash and rerun never answers twice.

Run `uv run tellback serve`, create an agent (its token is shown once), then:

    TELLBACK_AGENT_TOKEN=tbg_... uv run python examples/agent_bot.py [--once]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import httpx


def reply_for(body: str | None) -> str:
    text = (body or "").lower()
    if "crash" in text:
        return "Sorry about the crash! Could you tell us which app version you run?"
    return "Thanks for your feedback, we are looking into it."


def answer_open_conversations(http: httpx.Client) -> int:
    """Reply to every open conversation whose newest message is from the end user."""
    answered = 0
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"status": "open", "limit": 100}
        if cursor:
            params["cursor"] = cursor
        page = http.get("/v1/agent/conversations", params=params)
        page.raise_for_status()
        data = page.json()
        for conv in data["items"]:
            last = conv.get("last_message") or {}
            if (last.get("author") or {}).get("type") != "user":
                continue
            r = http.post(
                f"/v1/agent/conversations/{conv['id']}/messages",
                json={"body": reply_for(last.get("body"))},
                headers={"Idempotency-Key": f"bot-reply-{last['id']}"},
            )
            r.raise_for_status()
            answered += 1
            print(f"answered {conv['id']}: {last.get('body')!r}")
        cursor = data.get("next_cursor")
        if cursor is None:
            return answered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--once", action="store_true", help="answer once and exit")
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args()
    token = os.environ.get("TELLBACK_AGENT_TOKEN")
    if not token:
        print("set TELLBACK_AGENT_TOKEN to an agent token", file=sys.stderr)
        return 2
    base = os.environ.get("TELLBACK_URL", "http://127.0.0.1:8080")
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as http:
        try:
            while True:
                answer_open_conversations(http)
                if args.once:
                    return 0
                time.sleep(args.interval)
        except KeyboardInterrupt:  # Ctrl-C is how it stops; a reply cut short is retried
            return 0  # by the next run with the same key


if __name__ == "__main__":
    raise SystemExit(main())
