"""The offline outbox's persistent queue (no I/O but the local SQLite file and file copies).

Rules (see the outbox notes in the README / sdk-spec):
- An item is written, with its idempotency key and copies of its files, before the
  caller gets its ``QueuedItem``; it is marked sent only after the server answered.
- The wire body is frozen (stored) before its first send and reused byte for byte,
  so a resend after a crash is a replay, never a second conversation.
- Items go out in the order they were queued, per owner (the user who queued them).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tellback_sdk._core import encode, new_idempotency_key
from tellback_sdk._store import OWNER, PRIVATE_FILE, Store, private_dir, set_in, value_in
from tellback_sdk._uploads import guess_content_type, kind_for
from tellback_sdk.errors import AttachmentEmptyError, UserChangedError

LOCAL_PREFIX = "local:"
SENT_RETENTION = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class AttachmentFile:
    """A file to attach; ``kind``/``content_type`` are guessed from the name when omitted."""

    path: str | Path
    kind: str | None = None
    content_type: str | None = None
    filename: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxFailure:
    status: int | None
    code: str | None
    message: str


@dataclass(frozen=True, slots=True)
class QueuedItem:
    """A queued conversation or message. ``state``: pending | sent | dead."""

    id: str
    kind: str  # conversation | message
    state: str
    body: str | None
    conversation_id: str | None  # the server's id, once known
    local_conversation_id: str | None  # a queued conversation this message waits for
    remote_id: str | None  # the created conversation's / message's id
    attempts: int
    error: OutboxFailure | None
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Resolved:
    path: str | None  # where to POST, or None: wait / dead
    dead_reason: str | None = None


class OutboxStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # ----- queueing -----------------------------------------------------------------------

    def enqueue(
        self,
        owner: str,
        kind: str,
        request: dict[str, Any],
        conversation_ref: str | None,
        files: Sequence[AttachmentFile],
    ) -> QueuedItem:
        item_id, attachments = self.copy_files(files)
        return self.insert(item_id, owner, kind, request, conversation_ref, attachments)

    def copy_files(self, files: Sequence[AttachmentFile]) -> tuple[str, list[dict[str, Any]]]:
        """A new item id and durable copies of its files (nothing names them yet)."""
        for f in files:  # refused now, while the user can still pick another file
            if Path(f.path).stat().st_size < 1:
                name = f.filename or Path(f.path).name
                ct = (f.content_type or guess_content_type(name)).lower()
                att_kind = f.kind or kind_for(ct, name)
                raise AttachmentEmptyError(filename=name, kind=att_kind, content_type=ct)
        item_id = uuid.uuid4().hex
        if not files:
            return item_id, []
        folder = self.store.files_dir / item_id
        attachments = []
        try:
            private_dir(self.store.files_dir)
            private_dir(folder)
            for n, f in enumerate(files):
                src = Path(f.path)
                # A copy, so the app may delete its original (a camera temp file) at once.
                dest = folder / f"{n}-{src.name}"
                _durable_copy(src, dest)
                attachments.append(
                    {
                        # Relative to files_dir: the app may move its data directory.
                        "path": f"{item_id}/{dest.name}",
                        "kind": f.kind,
                        "content_type": f.content_type,
                        "filename": f.filename or src.name,
                        "attachment_id": None,
                    }
                )
            # The row will name these copies: their directory entries reach the disk
            # first (the folder's, and the folder's own in files_dir and data_dir, both
            # maybe just made), or a power cut could leave an item without its files.
            for directory in (folder, self.store.files_dir, self.store.data_dir):
                _fsync_dir(directory)
        except BaseException:
            self.drop_files(item_id)
            raise
        return item_id, attachments

    def drop_files(self, item_id: str) -> None:
        shutil.rmtree(self.store.files_dir / item_id, ignore_errors=True)

    def insert(
        self,
        item_id: str,
        owner: str,
        kind: str,
        request: dict[str, Any],
        conversation_ref: str | None,
        attachments: list[dict[str, Any]],
    ) -> QueuedItem:
        """The item is queued from here on (its key made now, once), unless ``owner`` is no
        longer the owner: the user logged out, on another thread, after the caller read
        it (the purge is done; the row would be sent as no one, or as the next user).
        Then nothing is queued and the file copies go."""
        now = time.time()
        with self.store.tx() as db:
            if value_in(db, OWNER) != owner:
                self.drop_files(item_id)
                raise UserChangedError()
            db.execute(
                "INSERT INTO outbox (id, owner, kind, conversation_ref, request, attachments, "
                "idempotency_key, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item_id,
                    owner,
                    kind,
                    conversation_ref,
                    encode(request).decode(),
                    json.dumps(attachments),
                    new_idempotency_key(),
                    now,
                    now,
                ),
            )
        item = self.get(item_id)
        assert item is not None
        return item

    # ----- reading ------------------------------------------------------------------------

    def _row(self, item_id: str) -> sqlite3.Row | None:
        rows = self.store.query("SELECT * FROM outbox WHERE id = ?", (item_id,))
        return rows[0] if rows else None

    def get(self, item_id: str) -> QueuedItem | None:
        row = self._row(item_id)
        return self._item(row) if row is not None else None

    def _item(self, row: sqlite3.Row) -> QueuedItem:
        ref = row["conversation_ref"]
        local = ref[len(LOCAL_PREFIX) :] if ref and ref.startswith(LOCAL_PREFIX) else None
        conversation_id = None if local else ref
        if row["kind"] == "conversation":
            conversation_id = row["remote_id"]
        elif local is not None:
            parent = self._row(local)
            conversation_id = parent["remote_id"] if parent is not None else None
        try:
            error = json.loads(row["last_error"]) if row["last_error"] else None
            failure = OutboxFailure(**error) if error else None
        except (ValueError, TypeError):
            failure = OutboxFailure(None, "local", "the stored error cannot be read")
        try:
            body = json.loads(row["request"]).get("body")
        except (ValueError, AttributeError):
            body = None  # unreadable: the flush makes it a dead letter (unreadable())
        return QueuedItem(
            id=row["id"],
            kind=row["kind"],
            state=row["state"],
            body=body,
            conversation_id=conversation_id,
            local_conversation_id=local,
            remote_id=row["remote_id"],
            attempts=row["attempts"],
            error=failure,
            created_at=dt.datetime.fromtimestamp(row["created_at"], dt.UTC),
        )

    def items(self, owner: str, state: str) -> list[QueuedItem]:
        rows = self.store.query(
            "SELECT * FROM outbox WHERE owner = ? AND state = ? ORDER BY seq", (owner, state)
        )
        return [self._item(r) for r in rows]

    def next_pending(self, owner: str) -> sqlite3.Row | None:
        rows = self.store.query(
            "SELECT * FROM outbox WHERE owner = ? AND state = 'pending' ORDER BY seq LIMIT 1",
            (owner,),
        )
        return rows[0] if rows else None

    def resolve(self, row: sqlite3.Row) -> Resolved:
        """Where this item is POSTed; a message for a queued conversation uses its real id."""
        if row["kind"] == "conversation":
            return Resolved("/v1/client/conversations")
        ref: str = row["conversation_ref"]
        if ref.startswith(LOCAL_PREFIX):
            parent = self._row(ref[len(LOCAL_PREFIX) :])
            if parent is None:
                return Resolved(None, "its conversation was discarded")
            if parent["state"] == "dead":
                return Resolved(None, "its conversation could not be sent")
            if parent["state"] != "sent":
                return Resolved(None)  # FIFO makes this rare: the parent is still queued
            ref = parent["remote_id"]
        return Resolved(f"/v1/client/conversations/{ref}/messages")

    def unreadable(self, row: sqlite3.Row) -> str | None:
        """Why this row cannot be sent as stored (a torn write, a bit flip, a row of a
        newer SDK version), or None. Such a row becomes a dead letter, never a block."""
        try:
            request = json.loads(row["request"])
            atts = json.loads(row["attachments"])
            ok = isinstance(request, dict) and isinstance(atts, list)
            ok = ok and all(isinstance(a, dict) and isinstance(a.get("path"), str) for a in atts)
            if ok and row["kind"] == "message":
                ok = isinstance(row["conversation_ref"], str)
        except (ValueError, TypeError):
            ok = False
        return None if ok else "this item is stored in a form this SDK cannot read"

    def attachments(self, row: sqlite3.Row) -> list[dict[str, Any]]:
        """The item's files, each ``path`` made absolute under today's data directory."""
        value: list[dict[str, Any]] = json.loads(row["attachments"])
        for att in value:
            att["path"] = str(self._local(att["path"]))
        return value

    def _local(self, stored: str) -> Path:
        path = Path(stored)
        if not path.is_absolute():
            return self.store.files_dir / path
        if path.exists():
            return path
        # Stored absolute by an older version, in a data directory moved since.
        return self.store.files_dir / path.parent.name / path.name

    # ----- progress of one item -----------------------------------------------------------

    # Every change of an item's progress applies only to a pending item: another client
    # on this data directory may have sent it, or the app discarded it, meanwhile.

    def set_attachment_id(self, item_id: str, index: int, attachment_id: str) -> None:
        with self.store.tx() as db:
            raw = db.execute(
                "SELECT attachments FROM outbox WHERE id = ? AND state = 'pending'", (item_id,)
            ).fetchone()
            if raw is None:
                return
            atts = json.loads(raw["attachments"])
            atts[index]["attachment_id"] = attachment_id
            db.execute(
                "UPDATE outbox SET attachments = ? WHERE id = ?", (json.dumps(atts), item_id)
            )

    def upload_again(self, item_id: str, indexes: Sequence[int]) -> bool:
        """The item's own uploads at ``indexes`` are gone from the server (an upload no
        message took expires after days, e.g. on a phone offline since it uploaded):
        forget their ids, so the next attempt uploads the kept copies again, and thaw
        the body that named them. Once per upload: False (nothing changed) when
        ``indexes`` is empty or names one already uploaded again."""
        with self.store.tx() as db:
            raw = db.execute(
                "SELECT attachments FROM outbox WHERE id = ? AND state = 'pending'", (item_id,)
            ).fetchone()
            if raw is None or not indexes:
                return False
            atts = json.loads(raw["attachments"])
            if any(not 0 <= i < len(atts) or atts[i].get("uploaded_again") for i in indexes):
                return False
            for i in indexes:
                atts[i]["attachment_id"] = None
                atts[i]["uploaded_again"] = True
            db.execute(
                "UPDATE outbox SET attachments = ?, wire_body = NULL WHERE id = ?",
                (json.dumps(atts), item_id),
            )
            return True

    def fresh(self, item_id: str) -> sqlite3.Row | None:
        """The item's row as stored now."""
        return self._row(item_id)

    def wire_body(self, item_id: str) -> bytes:
        """The bytes to send, frozen on first use so every resend is byte-identical."""
        with self.store.tx() as db:
            row = db.execute("SELECT * FROM outbox WHERE id = ?", (item_id,)).fetchone()
            if row["wire_body"] is not None:
                frozen: bytes = row["wire_body"]
                return frozen
            request = json.loads(row["request"])
            uploaded = [a["attachment_id"] for a in json.loads(row["attachments"])]
            ids = list(request.pop("attachment_ids", [])) + uploaded
            if ids:
                request["attachment_ids"] = ids
            body = encode(request)
            db.execute("UPDATE outbox SET wire_body = ? WHERE id = ?", (body, item_id))
            return body

    def note_attempt(self, item_id: str) -> None:
        with self.store.tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, updated_at = ? "
                "WHERE id = ? AND state = 'pending'",
                (time.time(), item_id),
            )

    def note_failure(
        self,
        item_id: str,
        failure: OutboxFailure,
        *,
        dead: bool,
        server_failure: bool = False,
        give_up: tuple[int, float] | None = None,
    ) -> str | None:
        """Record a failed attempt; the item's new state ("pending" or "dead"), or None
        if it is no longer pending (sent or discarded meanwhile): a delivered item is
        never turned into a dead letter. ``server_failure``: the server itself failed
        on this item; ``give_up`` (count, seconds): so many of those, over at least so
        long, make it a dead letter."""
        now = time.time()
        with self.store.tx() as db:
            row = db.execute(
                "SELECT server_failures, failing_since FROM outbox "
                "WHERE id = ? AND state = 'pending'",
                (item_id,),
            ).fetchone()
            if row is None:
                return None
            failures, since = row["server_failures"], row["failing_since"]
            if server_failure:
                failures, since = failures + 1, since if since is not None else now
                if not dead and give_up is not None:
                    count, seconds = give_up
                    if failures >= count and now - since >= seconds:
                        dead = True
                        failure = OutboxFailure(
                            failure.status,
                            failure.code,
                            f"{failure.message} (the server failed on it {failures} times "
                            f"over {int(now - since)} s; given up so later items can go)",
                        )
            state = "dead" if dead else "pending"
            db.execute(
                "UPDATE outbox SET last_error = ?, state = ?, updated_at = ?, "
                "server_failures = ?, failing_since = ? WHERE id = ?",
                (json.dumps(_as_dict(failure)), state, now, failures, since, item_id),
            )
            return state

    def mark_sent(self, item_id: str, remote_id: str) -> None:
        now = time.time()
        with self.store.tx() as db:
            # The server's 2xx is the truth, whatever this row said (even dead).
            db.execute(
                "UPDATE outbox SET state = 'sent', remote_id = ?, last_error = NULL, "
                "updated_at = ? WHERE id = ? AND state != 'sent'",
                (remote_id, now, item_id),
            )
            # A week after sending, a message's row goes, and a conversation's keeps only
            # its local id -> server id: the app may queue a follow-up with the
            # QueuedItem it took before the send, years later.
            cutoff = now - SENT_RETENTION
            db.execute(
                "DELETE FROM outbox WHERE state = 'sent' AND kind = 'message' AND updated_at < ?",
                (cutoff,),
            )
            db.execute(
                "UPDATE outbox SET request = '{}', attachments = '[]', wire_body = NULL "
                "WHERE state = 'sent' AND kind = 'conversation' AND updated_at < ? "
                "AND request != '{}'",
                (cutoff,),
            )
        shutil.rmtree(self.store.files_dir / item_id, ignore_errors=True)

    # ----- the app's controls -------------------------------------------------------------

    def retry(self, item_id: str) -> bool:
        """A dead item goes back into the queue at its old position, with its old key
        (a final 4xx stored nothing under it) and a freshly built body."""
        with self.store.tx() as db:
            cur = db.execute(
                "UPDATE outbox SET state = 'pending', wire_body = NULL, last_error = NULL, "
                "server_failures = 0, failing_since = NULL, updated_at = ? "
                "WHERE id = ? AND state = 'dead'",
                (time.time(), item_id),
            )
            return cur.rowcount == 1

    def discard(self, item_id: str) -> bool:
        with self.store.tx() as db:
            cur = db.execute("DELETE FROM outbox WHERE id = ? AND state != 'sent'", (item_id,))
        shutil.rmtree(self.store.files_dir / item_id, ignore_errors=True)
        return cur.rowcount == 1

    def purge(self, owner: str, successor: str) -> int:
        """Logout: the previous user's unsent items, upload state and file copies go, and
        ``successor`` owns what comes next, in the same transaction: an item queued at
        the same time is either purged with the rest (and counted) or refused."""
        with self.store.tx() as db:
            rows = list(db.execute("SELECT id, state FROM outbox WHERE owner = ?", (owner,)))
            db.execute("DELETE FROM outbox WHERE owner = ?", (owner,))
            db.execute("DELETE FROM uploads WHERE owner = ?", (owner,))
            set_in(db, OWNER, successor)
        for row in rows:
            shutil.rmtree(self.store.files_dir / row["id"], ignore_errors=True)
        return sum(1 for r in rows if r["state"] != "sent")


def _durable_copy(src: Path, dest: Path) -> None:
    # Made 0600 before a byte is written (copyfile keeps the mode of a file it
    # overwrites): a user's photo, readable by this user only.
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE))
    shutil.copyfile(src, dest)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory; NTFS journals its entries
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_dict(failure: OutboxFailure) -> dict[str, Any]:
    return {"status": failure.status, "code": failure.code, "message": failure.message}
