"""The SDK's local state: one SQLite file in ``data_dir``.

Holds the installation id, the session, resumable uploads and the offline
outbox. Every write commits with ``synchronous=FULL`` before the SDK acts on
it (write-ahead), so a crash at any point finds the intent on disk. One
connection, guarded by a lock, serves sync threads and the async event loop
alike: the statements are tiny and local.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (
    resume_key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    upload_id TEXT,
    etags TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    conversation_ref TEXT,
    request TEXT NOT NULL,
    attachments TEXT NOT NULL DEFAULT '[]',
    idempotency_key TEXT NOT NULL,
    wire_body BLOB,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    remote_id TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    server_failures INTEGER NOT NULL DEFAULT 0,
    failing_since REAL
);
"""
# The kv key naming whose the queued items and upload state are: a new random owner at
# every logout, so nothing queued by one user is ever sent as, or shown to, the next.
OWNER = "owner"

# Columns added since the first release, for data directories made before them.
_ADDED = {
    "outbox": (
        ("server_failures", "INTEGER NOT NULL DEFAULT 0"),
        ("failing_since", "REAL"),
    )
}


DB_NAME = "tellback-sdk.db"
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> None:
    """Make (or, as the SDK's own, tighten) a directory only this user can enter."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    _chmod(path, PRIVATE_DIR)


def _private_file(db_path: Path) -> None:
    """Create the database file 0600 before SQLite opens it: SQLite then gives its
    ``-wal`` and ``-shm`` files the database file's mode. Files an older SDK made with
    the umask's mode (0644) are tightened."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = db_path.with_name(db_path.name + suffix)
        if path.exists():
            _chmod(path, PRIVATE_FILE)


def _chmod(path: Path, mode: int) -> None:
    if os.name != "posix":  # Windows keeps a user's profile private by ACLs, not modes
        return
    if path.stat().st_mode & 0o777 != mode:
        path.chmod(mode)


class Store:
    def __init__(self, data_dir: str | Path | None) -> None:
        self._tmp: str | None = None
        if data_dir is None:
            # No persistence asked for: keep state (and outbox file copies) for this process.
            self._tmp = tempfile.mkdtemp(prefix="tellback-sdk-")
            data_dir = self._tmp
        self.data_dir = Path(data_dir).expanduser()
        # The session token and copies of users' files live here: readable by this user
        # only. A directory the app made is the app's to set (it may be shared with its
        # other files); what the SDK makes in it is private whatever the umask.
        self.data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        self.files_dir = self.data_dir / "outbox-files"
        self._lock = threading.RLock()
        db_path = self.data_dir / DB_NAME
        _private_file(db_path)
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._add_columns()
        self.persistent = self._tmp is None

    def _add_columns(self) -> None:
        with self.tx() as db:
            for table, columns in _ADDED.items():
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns:
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args))

    # ----- key/value ----------------------------------------------------------------------

    def get(self, key: str) -> Any:
        with self._lock:
            return value_in(self._db, key)

    def set(self, key: str, value: Any) -> None:
        with self.tx() as db:
            set_in(db, key, value)

    def setdefault(self, key: str, value: Any) -> Any:
        """The stored value of ``key``, first storing ``value`` if it has none, in one
        transaction: two threads asking at once get the same answer."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (key, json.dumps(value)),
            )
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            return json.loads(row["value"])

    def delete_prefix(self, prefix: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM kv WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))

    def installation_id(self) -> str:
        """A random id made once per install (never derived from hardware)."""
        return str(self.setdefault("installation_id", uuid.uuid4().hex))


def value_in(db: sqlite3.Connection, key: str) -> Any:
    """The value of ``key`` (``None`` if unset), read on ``db``: within its transaction
    when the caller holds one."""
    row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return json.loads(row["value"]) if row else None


def set_in(db: sqlite3.Connection, key: str, value: Any) -> None:
    """Set (``None``: delete) ``key`` on ``db``, within the caller's transaction."""
    if value is None:
        db.execute("DELETE FROM kv WHERE key = ?", (key,))
    else:
        db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )
