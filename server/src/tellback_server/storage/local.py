"""Local-disk storage for the embedded default.

Clients upload to the server itself (``PUT /v1/storage/<key>?...&sig=``) with
URLs that are HMAC-signed with a key derived from ``TELLBACK_SECRET_KEY`` and
expire; the same shape as S3 presigned URLs, so the SDK flow is identical.
Bytes are streamed to a temp file in chunks (never held whole in memory) and
renamed into place; the signed maximum size is enforced while streaming.
Multipart parts are written straight into one file at their offsets
(``.multipart/<upload id>/data``; a part's ETag and size are recorded only once
all its bytes arrived), so completing an upload is a rename, not a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from tellback_server.security import b64url, signing_key
from tellback_server.storage.base import ObjectInfo, PresignedRequest, StorageError, UploadedPart

_KEY = re.compile(r"^[a-z0-9][a-z0-9/_.\-]{0,400}$")
_UPLOAD_ID = re.compile(r"^[A-Za-z0-9_\-]{16,64}$")


class BadSignature(Exception):
    """The storage URL is tampered with, expired, or for another operation."""


class TooLarge(Exception):
    """More bytes arrived than the signed URL allows."""


@dataclass(frozen=True, slots=True)
class SignedOp:
    op: str  # put | get
    key: str
    max_size: int
    upload_id: str
    part: int
    filename: str
    content_type: str


def _check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key or "//" in key:
        raise ValueError(f"invalid storage key {key!r}")
    return key


class LocalStore:
    kind = "local"
    revokes_upload_urls = True  # the PUT handler asks whether the upload is pending

    def __init__(self, root: Path, secret_key: str, base_url: str) -> None:
        self.root = root
        self.base_url = base_url.rstrip("/")
        self._sign_key = signing_key(secret_key, "local-storage")

    # ----- paths --------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _parts_dir(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.match(upload_id):
            raise ValueError("invalid upload id")
        return self.root / ".multipart" / upload_id

    # ----- signing ------------------------------------------------------------------------

    def _signature(self, op: SignedOp, exp: int) -> str:
        message = "\n".join(
            [
                op.op,
                op.key,
                str(exp),
                str(op.max_size),
                op.upload_id,
                str(op.part),
                op.filename,
                op.content_type,
            ]
        )
        return b64url(hmac.new(self._sign_key, message.encode(), hashlib.sha256).digest())

    def sign(self, op: SignedOp, expires: dt.timedelta) -> str:
        exp = int(time.time() + expires.total_seconds())
        query = {
            "op": op.op,
            "exp": str(exp),
            "max": str(op.max_size),
            "uid": op.upload_id,
            "part": str(op.part),
            "fn": op.filename,
            "ct": op.content_type,
            "sig": self._signature(op, exp),
        }
        return f"{self.base_url}/v1/storage/{op.key}?{urlencode(query)}"

    def verify(self, key: str, query: dict[str, str], op: str) -> SignedOp:
        try:
            signed = SignedOp(
                op=query["op"],
                key=_check_key(key),
                max_size=int(query["max"]),
                upload_id=query["uid"],
                part=int(query["part"]),
                filename=query["fn"],
                content_type=query["ct"],
            )
            exp = int(query["exp"])
            sig = query["sig"]
        except (KeyError, ValueError):
            raise BadSignature("malformed storage URL") from None
        if signed.op != op or not hmac.compare_digest(sig, self._signature(signed, exp)):
            raise BadSignature("storage URL signature does not match")
        if exp < time.time():
            raise BadSignature("storage URL has expired")
        return signed

    # ----- receiving bytes ----------------------------------------------------------------

    async def receive(self, signed: SignedOp, chunks: AsyncIterator[bytes]) -> str:
        """Stream an upload (whole object or one part) to disk; return its ETag (MD5 hex)."""
        if signed.upload_id:
            return await self._receive_part(signed, chunks)
        target = self.path(signed.key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            with tmp.open("wb") as fh:
                etag, _ = await _stream(chunks, signed.max_size, fh.fileno(), 0)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return etag

    async def _receive_part(self, signed: SignedOp, chunks: AsyncIterator[bytes]) -> str:
        folder = self._parts_dir(signed.upload_id)
        if not folder.is_dir():
            raise BadSignature("this multipart upload no longer exists")
        record = folder / f"{signed.part:05d}.etag"
        record.unlink(missing_ok=True)  # a part being re-sent is not done until it is
        fd = os.open(folder / "data", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            offset = (signed.part - 1) * signed.max_size
            etag, size = await _stream(chunks, signed.max_size, fd, offset)
        finally:
            os.close(fd)
        tmp = record.with_name(f".{record.name}.{secrets.token_hex(6)}")
        tmp.write_text(f"{etag} {size}")
        os.replace(tmp, record)
        return etag

    # ----- ObjectStore --------------------------------------------------------------------

    async def ensure_ready(self) -> None:
        try:
            (self.root / ".multipart").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.root}: {exc.strerror}") from exc

    async def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable")

    async def presign_put(
        self, key: str, content_type: str, size: int, expires: dt.timedelta
    ) -> PresignedRequest:
        url = self.sign(SignedOp("put", key, size, "", 0, "", content_type), expires)
        return PresignedRequest(url=url, headers={"Content-Type": content_type})

    async def create_multipart(self, key: str, content_type: str) -> str:
        _check_key(key)
        upload_id = secrets.token_urlsafe(24)
        self._parts_dir(upload_id).mkdir(parents=True)
        return upload_id

    async def presign_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        part_size: int,
        length: int,
        expires: dt.timedelta,
    ) -> str:
        # The signed maximum is the part size, which also places the part in the file:
        # any part may be sent short here, and complete finds what is missing.
        return self.sign(SignedOp("put", key, part_size, upload_id, part_number, "", ""), expires)

    async def list_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        folder = self._parts_dir(upload_id)
        parts = []
        try:
            for record in sorted(folder.glob("[0-9]*.etag")):
                etag, size = record.read_text().split()
                parts.append(UploadedPart(int(record.name.split(".")[0]), etag, int(size)))
        except FileNotFoundError:  # completed or aborted meanwhile (S3: NoSuchUpload)
            return []
        return parts

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> None:
        folder = self._parts_dir(upload_id)
        uploaded = await self.list_parts(key, upload_id)
        stored = {p.part_number: p.etag for p in uploaded}
        for number, etag in parts:
            if stored.get(number) != etag.strip('"'):
                raise ValueError("InvalidPart")
        target = self.path(key)
        total = sum(p.size for p in uploaded)
        data = folder / "data"
        try:
            if data.stat().st_size != total:
                # Only when a part was re-sent shorter than before: drop the stale tail.
                os.truncate(data, total)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(data, target)
        except FileNotFoundError:  # assembled meanwhile, by a complete running at once
            raise ValueError("NoSuchUpload") from None
        await asyncio.to_thread(shutil.rmtree, folder, True)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self._parts_dir(upload_id), True)

    async def stat(self, key: str) -> ObjectInfo | None:
        try:
            return ObjectInfo(size=self.path(key).stat().st_size)
        except FileNotFoundError:
            return None

    async def read_head(self, key: str, length: int) -> bytes:
        with self.path(key).open("rb") as fh:
            return fh.read(length)

    async def download(self, key: str, target: Path) -> None:
        await asyncio.to_thread(shutil.copyfile, self.path(key), target)

    async def upload_file(self, key: str, source: Path, content_type: str) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.copyfile, source, dest)

    async def copy(self, source: str, target: str) -> bool:
        src, dest = self.path(source), self.path(target)
        partial = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")

        def copy() -> bool:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(src, partial)
            except FileNotFoundError:
                partial.unlink(missing_ok=True)
                return False
            os.replace(partial, dest)  # whole or not at all, as S3's copy
            return True

        return await asyncio.to_thread(copy)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    async def presign_get(
        self, key: str, expires: dt.timedelta, *, filename: str | None, content_type: str
    ) -> str:
        return self.sign(SignedOp("get", key, 0, "", 0, filename or "", content_type), expires)


async def _stream(
    chunks: AsyncIterator[bytes], max_size: int, fd: int, offset: int
) -> tuple[str, int]:
    """Write ``chunks`` at ``offset`` of ``fd``; return (MD5 hex, size). Enforces ``max_size``."""
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_size:
            raise TooLarge(f"more than the {max_size} bytes this URL allows")
        view = memoryview(chunk)
        while view:
            written = os.pwrite(fd, view, offset)
            offset += written
            view = view[written:]
        md5.update(chunk)
    return md5.hexdigest(), size
