"""``tellback-sdk`` / ``python -m tellback_sdk``: send and read feedback from a terminal.

    tellback-sdk send "The app crashes on start" --photo shot.png --lat 52.5 --lon 13.4
    tellback-sdk list
    tellback-sdk show CONVERSATION_ID
    tellback-sdk watch                 # live events until Ctrl-C

Base URL and app key come from --url/--app-key or TELLBACK_URL/TELLBACK_APP_KEY; state
(installation id, session, resumable uploads) lives in --data-dir (~/.tellback-sdk).
Uses ``rich`` for tables and a progress bar when installed (extra ``cli``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from tellback_sdk._client import Client
from tellback_sdk.errors import TellbackError
from tellback_sdk.events import (
    AttachmentUpdated,
    ConversationCreated,
    ConversationUpdated,
    LiveEvent,
    MessageCreated,
    Reset,
    UnknownEvent,
    UnreadChanged,
)
from tellback_sdk.types import Location

try:
    from rich.console import Console
    from rich.progress import Progress
except ImportError:  # the plain-text fallback below covers it
    Console = None  # type: ignore[assignment,misc]
    Progress = None  # type: ignore[assignment,misc]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tellback-sdk", description="Tellback feedback client")
    p.add_argument("--url", default=os.environ.get("TELLBACK_URL", "http://127.0.0.1:8080"))
    p.add_argument("--app-key", default=os.environ.get("TELLBACK_APP_KEY"))
    p.add_argument("--data-dir", default=os.environ.get("TELLBACK_SDK_DIR", "~/.tellback-sdk"))
    sub = p.add_subparsers(dest="command", required=True)
    send = sub.add_parser("send", help="send feedback")
    send.add_argument("text")
    send.add_argument("--photo", action="append", default=[], help="attach a photo")
    send.add_argument("--file", action="append", default=[], help="attach a file")
    send.add_argument("--lat", type=float)
    send.add_argument("--lon", type=float)
    send.add_argument("--queue", action="store_true", help="queue offline, send later")
    sub.add_parser("list", help="my conversations")
    show = sub.add_parser("show", help="a conversation's messages")
    show.add_argument("conversation_id")
    sub.add_parser("flush", help="send queued feedback")
    watch = sub.add_parser("watch", help="print live events (replies, status, unread)")
    watch.add_argument("--from", dest="last_event_id", help="resume after this event id")
    watch.add_argument("--count", type=int, help="stop after this many events")
    watch.add_argument("--no-reconnect", action="store_true", help="stop when disconnected")
    return p


def _progress_printer(name: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    # Progress goes to stderr, out of the way of what the command prints. rich's bar
    # only on a terminal: elsewhere it cannot redraw, and stopping it wrote an empty
    # line (to stdout, where it used to draw, before `sent <id>`).
    if Progress is not None and Console is not None:
        if not sys.stderr.isatty():
            return lambda _sent, _total: None, lambda: None
        bar = Progress(transient=True, console=Console(stderr=True))
        bar.start()
        task = bar.add_task(f"uploading {name}", total=None)

        def rich_update(sent: int, total: int) -> None:
            bar.update(task, completed=sent, total=total)

        return rich_update, bar.stop

    def plain_update(sent: int, total: int) -> None:
        print(f"\ruploading {name}: {sent * 100 // max(total, 1)}%", end="", file=sys.stderr)

    return plain_update, lambda: print(file=sys.stderr)


def _send(tb: Client, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    fields: dict[str, Any] = {}
    if args.lat is not None and args.lon is not None:
        fields["location"] = Location(latitude=args.lat, longitude=args.lon)
    if args.queue:
        item = tb.conversations.create(
            args.text, queue=True, attachments=[*args.photo, *args.file], **fields
        )
        out(f"queued {item.id}; run `tellback-sdk flush` when online")
        return 0
    ids = []
    for path, kind in [(p, "photo") for p in args.photo] + [(f, "file") for f in args.file]:
        update, done = _progress_printer(os.path.basename(path))
        try:
            ids.append(tb.attachments.upload(path, kind=kind, on_progress=update).id)
        finally:
            done()
    conv = tb.conversations.create(args.text, attachment_ids=ids, **fields)
    out(f"sent {conv.id}")
    return 0


def _list(tb: Client, out: Callable[[str], None]) -> int:
    for conv in tb.conversations.list():
        last = conv.last_message.body if conv.last_message else ""
        out(f"{conv.id}  {conv.status:<8} unread={conv.unread_count}  {(last or '')[:60]}")
    return 0


def _show(tb: Client, conversation_id: str, out: Callable[[str], None]) -> int:
    for m in tb.messages.list(conversation_id):
        who = m.author.name or m.author.type
        files = f" [{len(m.attachments)} attachment(s)]" if m.attachments else ""
        out(f"{m.created_at:%Y-%m-%d %H:%M}  {who}: {m.body or ''}{files}")
    tb.conversations.mark_read(conversation_id)
    return 0


def describe(event: LiveEvent) -> str:
    """One line per event (``#id`` is what ``--from`` takes)."""
    head = f"{event.type} #{event.id}" if event.id else event.type
    if isinstance(event, MessageCreated | ConversationCreated):
        message = event.message
        who = message.author.name or message.author.type
        files = f" [{len(message.attachments)} attachment(s)]" if message.attachments else ""
        return f"{head} conversation={event.conversation.id} {who}: {message.body or ''}{files}"
    if isinstance(event, ConversationUpdated):
        return f"{head} conversation={event.conversation.id} status={event.conversation.status}"
    if isinstance(event, UnreadChanged):
        return f"{head} unread={event.unread_count} conversation={event.data.conversation_id}"
    if isinstance(event, AttachmentUpdated):
        why = f" reason={event.data.reason}" if event.data.reason else ""
        return (
            f"{head} conversation={event.data.conversation_id} "
            f"attachment={event.attachment_id} status={event.status}{why}"
        )
    if isinstance(event, Reset):
        return f"{head} reason={event.reason}: events were missed, reload"
    if isinstance(event, UnknownEvent):
        return f"{head} {msgspec.json.encode(event.data).decode()}"
    return head


def _watch(tb: Client, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    seen = 0
    with tb.events.stream(args.last_event_id, reconnect=not args.no_reconnect) as events:
        try:
            for event in events:
                out(describe(event))
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: Sequence[str] | None = None, **client_options: Any) -> int:
    args = _parser().parse_args(argv)
    if not args.app_key:
        print("set --app-key or TELLBACK_APP_KEY", file=sys.stderr)
        return 2
    out: Callable[[str], None] = Console().print if Console is not None else print
    try:
        with Client(args.url, args.app_key, data_dir=args.data_dir, **client_options) as tb:
            if args.command == "send":
                return _send(tb, args, out)
            if args.command == "list":
                return _list(tb, out)
            if args.command == "show":
                return _show(tb, args.conversation_id, out)
            if args.command == "watch":
                return _watch(tb, args, out)
            result = tb.outbox.flush()
            out(f"sent {result.sent}, failed {result.dead}, still queued {result.pending}")
            return 0
    except TellbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
