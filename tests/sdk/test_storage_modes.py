"""The SDK's data dir holds session tokens and copies of users' files: this user's only."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tellback_sdk._store import Store
from tests.sdk.test_outbox_safety import FakeServer, client

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The common umask, under which files are made 0644 and directories 0755."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_dir_its_database_and_file_copies_are_private(tmp_path: Path) -> None:
    photo = tmp_path / "shot.png"
    photo.write_bytes(b"\x89PNG....")
    photo.chmod(0o644)
    data_dir = tmp_path / "sdk"
    with client(tmp_path, FakeServer()) as tb:
        tb.conversations.create("look", attachments=[photo])  # queued with a copy
        files = data_dir / "outbox-files"
        (folder,) = files.iterdir()
        (copy,) = folder.iterdir()
        modes = {"outbox-files": mode(files), "item folder": mode(folder), "copy": mode(copy)}
        assert tb.outbox.flush().sent == 1  # opens a session: its token is stored
        db = data_dir / "tellback-sdk.db"
        with sqlite3.connect(db) as reader:
            assert "tbs_" in str(reader.execute("SELECT value FROM kv").fetchall())
        modes |= {
            "data dir": mode(data_dir),
            "database": mode(db),
            "wal": mode(data_dir / "tellback-sdk.db-wal"),
            "shm": mode(data_dir / "tellback-sdk.db-shm"),
        }
    dirs, regular = 0o700, 0o600
    assert modes == {
        "data dir": dirs,
        "database": regular,
        "wal": regular,
        "shm": regular,
        "outbox-files": dirs,
        "item folder": dirs,
        "copy": regular,
    }


def test_a_directory_the_app_made_keeps_its_mode_and_old_files_are_tightened(
    tmp_path: Path,
) -> None:
    """An existing directory is the app's (it may share it); the SDK's own files in it,
    also those an older SDK made 0644, become private."""
    shared = tmp_path / "app-data"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    old_db = shared / "tellback-sdk.db"
    sqlite3.connect(old_db).close()
    (shared / "outbox-files").mkdir()
    old_db.chmod(0o644)
    (shared / "outbox-files").chmod(0o755)

    store = Store(shared)
    try:
        store.set("session", {"token": "tbs_x"})
    finally:
        store.close()
    photo = tmp_path / "shot.png"
    photo.write_bytes(b"\x89PNG....")
    (tmp_path / "sdk").symlink_to(shared)  # client() uses tmp_path / "sdk"
    with client(tmp_path, FakeServer()) as tb:
        tb.conversations.create("look", attachments=[photo])

    assert mode(shared) == 0o755
    assert mode(old_db) == 0o600
    assert mode(shared / "outbox-files") == 0o700
