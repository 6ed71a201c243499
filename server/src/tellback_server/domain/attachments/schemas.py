"""Wire types for uploads and attachments."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal
from uuid import UUID

import msgspec
from msgspec import Meta, Struct

Kind = Literal["photo", "video", "file", "log"]
UploadStatusName = Literal["pending", "processing", "ready", "rejected", "expired", "aborted"]


class UploadCreate(Struct):
    filename: Annotated[str, Meta(min_length=1, max_length=1024)]
    content_type: Annotated[str, Meta(min_length=3, max_length=100)]
    size: Annotated[int, Meta(ge=1)]  # (past the app's limit: 413, whatever the size)
    kind: Kind
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")] | None = None


class SingleUpload(Struct):
    url: str
    headers: dict[str, str]


class PartUrl(Struct):
    part_number: int
    url: str


class MultipartUpload(Struct):
    part_size: int
    part_count: int
    parts: list[PartUrl]


class UploadCreated(Struct):
    upload_id: UUID
    expires_at: dt.datetime
    method: Literal["single", "multipart"]
    single: SingleUpload | None = None
    multipart: MultipartUpload | None = None


class UploadedPartOut(Struct):
    part_number: int
    etag: str
    size: int


class UploadStatus(Struct):
    """What a client needs to resume: finished parts, and fresh URLs for the rest."""

    upload_id: UUID
    status: UploadStatusName
    kind: Kind
    filename: str
    content_type: str
    size: int
    method: Literal["single", "multipart"]
    expires_at: dt.datetime
    uploaded_parts: list[UploadedPartOut]
    reason: str | None = None
    single: SingleUpload | None = None
    multipart: MultipartUpload | None = None


class CompletePart(Struct):
    part_number: Annotated[int, Meta(ge=1, le=10000)]
    etag: Annotated[str, Meta(min_length=1, max_length=200)]


class UploadComplete(Struct):
    parts: list[CompletePart] = msgspec.field(default_factory=list)


class AttachmentOut(Struct):
    id: UUID
    kind: Kind
    filename: str
    content_type: str
    size: int
    status: UploadStatusName
    reason: str | None
    width: int | None
    height: int | None
    duration_s: float | None
    url: str | None
    thumbnail_url: str | None
    expires_at: dt.datetime | None
    created_at: dt.datetime


class KindLimitsOut(Struct):
    max_bytes: int
    content_types: list[str]


class AttachmentConfig(Struct):
    photo: KindLimitsOut
    video: KindLimitsOut
    file: KindLimitsOut
    log: KindLimitsOut
    multipart_threshold_bytes: int
