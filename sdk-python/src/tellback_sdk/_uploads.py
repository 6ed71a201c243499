"""Upload logic shared by the sync and async drivers: sources, local limit checks,
the part plan, and the resumable state kept in ``data_dir``.

A resume key names "this file, unchanged": path + size + mtime (or a content hash
for bytes), plus kind and type. The state row (idempotency key, upload id, part
ETags) is written *before* the request it protects, so a restart resends the
same create (the server replays the same upload) or asks the server which parts
it already holds (``GET /v1/client/uploads/{id}``).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import mimetypes
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tellback_sdk._core import new_idempotency_key
from tellback_sdk._store import Store
from tellback_sdk.errors import (
    AttachmentEmptyError,
    AttachmentTooLargeError,
    AttachmentTypeNotAllowedError,
)
from tellback_sdk.types import ClientConfig, MultipartPlan, SinglePlan, UploadedPart

CHUNK = 256 * 1024
UploadInput = str | os.PathLike[str] | bytes | IO[bytes]

_EXTRA_TYPES = {".heic": "image/heic", ".heif": "image/heif", ".webp": "image/webp"}
# Plain-text logs that ``mimetypes`` does not know (it says nothing for ``.log``): sent as
# text/plain of kind ``log``, which the server takes by default (sdk-spec/uploads.md).
LOG_SUFFIXES = frozenset({".log", ".logcat", ".crash"})
_EXTRA_TYPES.update(dict.fromkeys(LOG_SUFFIXES, "text/plain"))


@dataclass(frozen=True, slots=True)
class Part:
    number: int
    url: str
    offset: int
    length: int
    headers: dict[str, str] = field(default_factory=dict)


def _resolved(path: Path) -> Path:
    """``path`` made absolute with its links followed. A link loop is the ``OSError``
    (ELOOP) it is on Python 3.13, where 3.11 and 3.12 raise ``RuntimeError``: a caller
    that handles unreadable files handles it too."""
    try:
        return path.resolve()
    except RuntimeError as exc:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from exc


class Source:
    """Bytes to upload, read by range so a file is never held whole in memory."""

    def __init__(self, data: UploadInput, filename: str | None = None) -> None:
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._bytes: bytes | None = None
        self.path: Path | None = None
        if isinstance(data, bytes):
            self._bytes = data
            self.size = len(data)
            self.filename = filename or "attachment"
        elif isinstance(data, str | os.PathLike):
            self.path = _resolved(Path(data))
            stat = self.path.stat()
            self.size = stat.st_size
            self._mtime = stat.st_mtime_ns
            self.filename = filename or self.path.name
        else:
            self._file = data
            self.size = data.seek(0, io.SEEK_END)
            name = getattr(data, "name", None)
            self.filename = filename or (Path(name).name if isinstance(name, str) else "attachment")

    def resume_key(self, kind: str, content_type: str) -> str | None:
        """Stable across restarts for a file path or bytes; None for an anonymous stream."""
        if self.path is not None:
            ident = f"path:{self.path}|{self.size}|{self._mtime}"
        elif self._bytes is not None:
            ident = "sha256:" + hashlib.sha256(self._bytes).hexdigest()
        else:
            return None
        return hashlib.sha256(f"{ident}|{kind}|{content_type}".encode()).hexdigest()

    def read(self, offset: int, length: int) -> bytes:
        if self._bytes is not None:
            return self._bytes[offset : offset + length]
        with self._lock:
            if self._file is not None:
                self._file.seek(offset)
                return self._file.read(length)
            assert self.path is not None
            with self.path.open("rb") as f:
                f.seek(offset)
                return f.read(length)

    def chunks(self, offset: int, length: int) -> Iterator[bytes]:
        end = offset + length
        while offset < end:
            chunk = self.read(offset, min(CHUNK, end - offset))
            if not chunk:
                raise OSError("the file shrank while it was being uploaded")
            offset += len(chunk)
            yield chunk


def guess_content_type(filename: str) -> str:
    ext = os.path.splitext(filename)[1].lower()
    return _EXTRA_TYPES.get(ext) or mimetypes.guess_type(filename)[0] or "application/octet-stream"


def kind_for(content_type: str, filename: str = "") -> str:
    if os.path.splitext(filename)[1].lower() in LOG_SUFFIXES and content_type == "text/plain":
        return "log"
    if content_type.startswith("image/"):
        return "photo"
    if content_type.startswith("video/"):
        return "video"
    return "file"


def check_limits(
    config: ClientConfig, kind: str, size: int, content_type: str, filename: str = "the file"
) -> None:
    """Refuse locally what the server would refuse (sdk-spec/uploads.md: check first)."""
    if size < 1:
        raise AttachmentEmptyError(filename=filename, kind=kind, content_type=content_type)
    limits = config.attachments.for_kind(kind)
    if limits is None:
        return  # a kind this SDK version does not know: let the server decide
    # Compared as the server does: case-insensitive, parameters (";charset=...") dropped.
    essence = content_type.split(";", 1)[0].strip().lower()
    if essence not in {t.lower() for t in limits.content_types}:
        raise AttachmentTypeNotAllowedError(
            kind=kind, size=size, content_type=content_type, allowed=list(limits.content_types)
        )
    if size > limits.max_bytes:
        raise AttachmentTooLargeError(
            kind=kind, size=size, content_type=content_type, max_bytes=limits.max_bytes
        )


def plan_parts(
    size: int,
    single: SinglePlan | None,
    multipart: MultipartPlan | None,
) -> list[Part]:
    """The byte ranges still to send, from a create or status response."""
    if single is not None:
        return [Part(1, single.url, 0, size, dict(single.headers))]
    if multipart is None:
        return []
    ps = multipart.part_size
    return [
        Part(
            p.part_number, p.url, (p.part_number - 1) * ps, min(ps, size - (p.part_number - 1) * ps)
        )
        for p in multipart.parts
    ]


class UploadJob:
    """The persisted state of one upload (one row, or in memory for a bare stream)."""

    def __init__(self, store: Store, owner: str, resume_key: str | None) -> None:
        self.store = store
        self.owner = owner
        self.resume_key = resume_key
        self.idempotency_key = new_idempotency_key()
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}
        if resume_key is None:
            return
        rows = store.query(
            "SELECT * FROM uploads WHERE resume_key = ? AND owner = ?", (resume_key, owner)
        )
        if rows:
            row = rows[0]
            self.idempotency_key = row["idempotency_key"]
            self.upload_id = row["upload_id"]
            self.etags = {int(k): v for k, v in json.loads(row["etags"]).items()}
        else:
            self._save()

    def _save(self) -> None:
        if self.resume_key is None:
            return
        with self.store.tx() as db:
            db.execute(
                "INSERT INTO uploads (resume_key, owner, idempotency_key, upload_id, etags, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (resume_key) DO UPDATE SET "
                "owner = excluded.owner, idempotency_key = excluded.idempotency_key, "
                "upload_id = excluded.upload_id, etags = excluded.etags",
                (
                    self.resume_key,
                    self.owner,
                    self.idempotency_key,
                    self.upload_id,
                    json.dumps(self.etags),
                    time.time(),
                ),
            )

    def started(self, upload_id: str) -> None:
        self.upload_id = upload_id
        self._save()

    def part_done(self, number: int, etag: str) -> None:
        self.etags[number] = etag
        self._save()

    def restart(self) -> None:
        """The server forgot this upload (expired, aborted, another user): start over."""
        self.idempotency_key = new_idempotency_key()
        self.upload_id = None
        self.etags = {}
        self._save()

    def finished(self) -> None:
        if self.resume_key is not None:
            with self.store.tx() as db:
                db.execute("DELETE FROM uploads WHERE resume_key = ?", (self.resume_key,))

    def complete_body(self, server_parts: list[UploadedPart], multipart: bool) -> dict[str, Any]:
        if not multipart:
            return {"parts": []}
        etags = {p.part_number: p.etag for p in server_parts}
        etags.update(self.etags)
        return {"parts": [{"part_number": n, "etag": e} for n, e in sorted(etags.items())]}


class Progress:
    """Reports bytes sent over all parts; a retried part does not count twice."""

    def __init__(self, total: int, callback: Any) -> None:
        self.total = total
        self.callback = callback
        self.done = 0
        self._inflight: dict[int, int] = {}
        self._lock = threading.Lock()

    def start_part(self, number: int) -> None:
        with self._lock:
            self._inflight[number] = 0

    def advance(self, number: int, n: int) -> None:
        with self._lock:
            self._inflight[number] = self._inflight.get(number, 0) + n
            sent = self.done + sum(self._inflight.values())
        if self.callback is not None:
            self.callback(min(sent, self.total), self.total)

    def finish_part(self, number: int, length: int) -> None:
        with self._lock:
            self._inflight.pop(number, None)
            self.done += length

    def skip(self, length: int) -> None:
        """Bytes the server already had (a resumed upload)."""
        self.done += length
        if self.callback is not None:
            self.callback(min(self.done, self.total), self.total)
