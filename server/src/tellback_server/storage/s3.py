"""S3-compatible storage through the ``minio`` SDK (MinIO, AWS S3, SeaweedFS, R2).

minio's multipart calls (create, list parts, complete, abort) are private
methods (``_create_multipart_upload`` etc.): its public API only offers
"upload this whole stream", which would put every byte through the server.
We call the private methods deliberately, pin minio to 7.2.x, and run the
whole flow against a real S3 server (SeaweedFS) in the tests, so an SDK
change that breaks them fails CI instead of users' uploads.

minio's presigner signs the ``host`` header alone, so a presigned PUT would take
any number of bytes, up to S3's 5 GB for one request. Upload URLs are signed here
with ``content-length`` as well (SigV4 query signing, built from minio's own signer
pieces): S3 refuses a body of any other length with 403 ``SignatureDoesNotMatch``.
``TELLBACK_S3_SIGN_CONTENT_LENGTH=false`` goes back to the host alone, for a proxy
in front of storage that re-frames request bodies.

minio is synchronous (urllib3); every call runs in a worker thread of its own
client's pool (transfers, metadata, the readiness probe), as many threads as the
client has connections. Not asyncio's default pool: a stalled storage would hold
its few threads (``cpu_count + 4``), which DNS lookups (webhooks, APNs) and every
other ``to_thread`` share, and a probe would queue behind a stalled transfer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlunsplit

import urllib3
from minio import Minio, signer
from minio import time as s3time
from minio.commonconfig import CopySource
from minio.datatypes import Part
from minio.error import MinioException, S3Error
from minio.helpers import queryencode, sha256_hash

from tellback_server.settings import S3Settings
from tellback_server.storage.base import ObjectInfo, PresignedRequest, StorageError, UploadedPart

T = TypeVar("T")
Query = dict[str, str | list[str] | tuple[str]]  # minio's DictType (7.2.1 and later)
_MISSING = {"NoSuchKey", "NoSuchUpload", "NoSuchObject"}
METADATA_READ_S = 10.0  # a request's calls other than transfers
PING_S = 2.0  # readiness: connect and answer, each


class S3Store:
    kind = "s3"
    revokes_upload_urls = False  # a presigned PUT takes bytes until it expires

    def __init__(self, settings: S3Settings) -> None:
        self.bucket = settings.bucket
        self.endpoint = settings.endpoint
        self.sign_content_length = settings.sign_content_length

        def client(timeout: urllib3.Timeout, retries: urllib3.Retry | bool, size: int) -> Minio:
            http = urllib3.PoolManager(timeout=timeout, retries=retries, maxsize=size)
            return Minio(
                settings.endpoint,
                access_key=settings.access_key,
                secret_key=settings.secret_key,
                secure=settings.secure,
                region=settings.region,
                http_client=http,
            )

        # Three clients, as minio takes no timeout per call. Transfers (a file in or
        # out, a server-side copy, completing a large upload) may take a minute to
        # answer. A request's metadata calls answer in milliseconds unless storage is
        # stalled: 10 s, and one retry of a read (a kept-alive connection the server
        # closed), not two of 10 s more each. The readiness ping answers within 2 s,
        # once: a probe that waits longer than its caller is worse than a 503.
        retries = urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504))
        self.client = client(urllib3.Timeout(connect=3.0, read=60.0), retries, 16)
        self._metadata = client(
            urllib3.Timeout(connect=3.0, read=METADATA_READ_S), retries.new(read=1), 16
        )
        self._probe = client(urllib3.Timeout(connect=PING_S, read=PING_S), False, 2)
        self._threads = {
            id(self.client): ThreadPoolExecutor(16, thread_name_prefix="tellback-s3"),
            id(self._metadata): ThreadPoolExecutor(16, thread_name_prefix="tellback-s3-meta"),
            id(self._probe): ThreadPoolExecutor(2, thread_name_prefix="tellback-s3-probe"),
        }

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` (a client's method, or a function of ours that uses ``_metadata``) in
        a thread of that client's pool."""
        owner = getattr(fn, "__self__", self._metadata)
        threads = self._threads.get(id(owner), self._threads[id(self._metadata)])
        call = functools.partial(fn, *args, **kwargs)
        try:
            return await asyncio.get_running_loop().run_in_executor(threads, call)
        except S3Error:
            raise
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(
                f"object storage unavailable: cannot reach {self.endpoint}: {_cause(exc)}"
            ) from exc

    async def ensure_ready(self) -> None:
        # The probe first: a stalled storage held a start for two metadata reads (20 s).
        await self.ping()
        try:
            if not await self._call(self._metadata.bucket_exists, self.bucket):
                await self._call(self._metadata.make_bucket, self.bucket)
        except S3Error as exc:
            if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise StorageError(f"cannot create bucket: {exc.code}") from exc

    async def ping(self) -> None:
        try:
            await self._call(self._probe.bucket_exists, self.bucket)
        except S3Error as exc:
            raise StorageError(f"object storage error: {exc.code}") from exc

    async def presign_put(
        self, key: str, content_type: str, size: int, expires: dt.timedelta
    ) -> PresignedRequest:
        url = await self._call(self._presign_put, key, size, expires, {})
        return PresignedRequest(url=url, headers={"Content-Type": content_type})

    async def create_multipart(self, key: str, content_type: str) -> str:
        try:
            upload_id: str = await self._call(
                self._metadata._create_multipart_upload,
                self.bucket,
                key,
                {"Content-Type": content_type},
            )
        except S3Error as exc:
            raise StorageError(f"object storage error: {exc.code}") from exc
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
        query: Query = {"partNumber": str(part_number), "uploadId": upload_id}
        return await self._call(self._presign_put, key, length, expires, query)

    def _presign_put(self, key: str, length: int, expires: dt.timedelta, query: Query) -> str:
        """A presigned PUT of exactly ``length`` bytes: minio's ``presign_v4`` with
        ``content-length`` among the signed headers (AWS SigV4, query authentication)."""
        client = self._metadata  # (a region lookup, when none is set, is a metadata call)
        region = client._get_region(self.bucket)
        creds = client._provider.retrieve() if client._provider else None
        if creds is None or not self.sign_content_length:  # the host alone, as minio signs
            return client.get_presigned_url(
                "PUT", self.bucket, key, expires, extra_query_params=query
            )
        if creds.session_token:
            query = {**query, "X-Amz-Security-Token": creds.session_token}
        url = client._base_url.build(
            method="PUT", region=region, bucket_name=self.bucket, object_name=key,
            query_params=query,
        )  # fmt: skip
        date = s3time.utcnow()
        scope = signer._get_scope(date, region, "s3")
        headers = {"content-length": str(length), "host": url.netloc}
        names = ";".join(headers)  # sorted, as SigV4 wants
        signed_query = (url.query + "&" if url.query else "") + (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential={queryencode(creds.access_key + '/' + scope)}"
            f"&X-Amz-Date={s3time.to_amz_date(date)}"
            f"&X-Amz-Expires={int(expires.total_seconds())}"
            f"&X-Amz-SignedHeaders={queryencode(names)}"
        )
        canonical_request = "\n".join(
            [
                "PUT",
                url.path or "/",
                signer._get_canonical_query_string(signed_query),
                "".join(f"{name}:{value}\n" for name, value in headers.items()),
                names,
                "UNSIGNED-PAYLOAD",
            ]
        )
        string_to_sign = signer._get_string_to_sign(date, scope, sha256_hash(canonical_request))
        signing_key = signer._get_signing_key(creds.secret_key, date, region, "s3")
        signature = signer._get_signature(signing_key, string_to_sign)
        final = url._replace(query=f"{signed_query}&X-Amz-Signature={signature}")
        return urlunsplit(final)

    async def list_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        """Parts storage holds, once per part number (the last one listed wins: some
        servers list a re-sent part twice, while S3 replaces it)."""
        parts: dict[int, UploadedPart] = {}
        marker: str | None = None
        while True:
            try:
                result = await self._call(
                    self._metadata._list_parts,
                    self.bucket,
                    key,
                    upload_id,
                    max_parts=1000,
                    part_number_marker=marker,
                )
            except S3Error as exc:
                if exc.code in _MISSING:
                    return []
                raise StorageError(f"object storage error: {exc.code}") from exc
            for p in result.parts:
                etag = p.etag.strip('"')
                parts[p.part_number] = UploadedPart(p.part_number, etag, int(p.size or 0))
            if not result.is_truncated or not result.next_part_number_marker:
                return [parts[n] for n in sorted(parts)]
            marker = result.next_part_number_marker

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> None:
        try:
            await self._call(
                self.client._complete_multipart_upload,
                self.bucket,
                key,
                upload_id,
                [Part(n, etag) for n, etag in parts],
            )
        except S3Error as exc:
            if exc.code in {"InvalidPart", "InvalidPartOrder", "EntityTooSmall", *_MISSING}:
                raise ValueError(exc.code) from exc
            raise StorageError(f"object storage error: {exc.code}") from exc

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._call(self._metadata._abort_multipart_upload, self.bucket, key, upload_id)
        except S3Error as exc:
            if exc.code not in _MISSING:
                raise StorageError(f"object storage error: {exc.code}") from exc

    async def stat(self, key: str) -> ObjectInfo | None:
        try:
            obj = await self._call(self._metadata.stat_object, self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise StorageError(f"object storage error: {exc.code}") from exc
        return ObjectInfo(size=int(obj.size or 0))

    async def read_head(self, key: str, length: int) -> bytes:
        def read() -> bytes:
            response = self._metadata.get_object(self.bucket, key, offset=0, length=length)
            try:
                data: bytes = response.read()
                return data
            finally:
                response.close()
                response.release_conn()

        try:
            return await self._call(read)
        except S3Error as exc:
            raise StorageError(f"object storage error: {exc.code}") from exc

    async def download(self, key: str, target: Path) -> None:
        try:
            await self._call(self.client.fget_object, self.bucket, key, str(target))
        except S3Error as exc:
            if exc.code in _MISSING:  # as on local disk: the object, not storage, is gone
                raise FileNotFoundError(key) from exc
            raise StorageError(f"object storage error: {exc.code}") from exc

    async def upload_file(self, key: str, source: Path, content_type: str) -> None:
        try:
            await self._call(
                self.client.fput_object, self.bucket, key, str(source), content_type=content_type
            )
        except S3Error as exc:
            raise StorageError(f"object storage error: {exc.code}") from exc

    async def copy(self, source: str, target: str) -> bool:
        try:
            await self._call(
                self.client.copy_object, self.bucket, target, CopySource(self.bucket, source)
            )
        except S3Error as exc:
            if exc.code in _MISSING:
                return False
            raise StorageError(f"object storage error: {exc.code}") from exc
        return True

    async def delete(self, key: str) -> None:
        try:
            await self._call(self._metadata.remove_object, self.bucket, key)
        except S3Error as exc:
            if exc.code not in _MISSING:
                raise StorageError(f"object storage error: {exc.code}") from exc

    async def presign_get(
        self, key: str, expires: dt.timedelta, *, filename: str | None, content_type: str
    ) -> str:
        headers = {"response-content-type": content_type}
        if filename is not None:
            headers["response-content-disposition"] = content_disposition(filename)
        return await self._call(
            self._metadata.get_presigned_url,
            "GET",
            self.bucket,
            key,
            expires,
            response_headers=headers,
        )


# What a call's failure means to an operator, most telling first (TLS before the
# connection it broke).
_REASONS: tuple[tuple[type[BaseException], Callable[[Any], str]], ...] = (
    (ssl.SSLCertVerificationError, lambda e: f"TLS certificate not trusted: {e.verify_message}"),
    (ssl.SSLError, lambda e: f"TLS handshake failed: {e.reason} (is TELLBACK_S3_SECURE right?)"),
    (ConnectionRefusedError, lambda _: "connection refused"),
    (socket.gaierror, lambda e: f"cannot resolve the host name ({e.strerror})"),
    (urllib3.exceptions.ReadTimeoutError, lambda _: "no answer in time (read timed out)"),
    (urllib3.exceptions.ProtocolError, lambda _: "the connection closed without an answer"),
)


def _cause(exc: BaseException) -> str:
    """What kept a call from storage, found under urllib3's wrappers (``MaxRetryError``
    alone sent an operator to the network when the TLS setting was wrong)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(current)
        if isinstance(current, urllib3.exceptions.MaxRetryError) and current.reason:
            current = current.reason
        elif isinstance(current, urllib3.exceptions.SSLError) and current.args:
            inner = current.args[0]
            current = inner if isinstance(inner, BaseException) else current.__cause__
        else:
            current = current.__cause__ or current.__context__
    for kind, words in _REASONS:
        for error in chain:
            if isinstance(error, kind):
                return words(error)
    for error in chain:
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
    if any(isinstance(error, urllib3.exceptions.ConnectTimeoutError) for error in chain):
        return "no connection in time (connect timed out)"
    return type(chain[-1]).__name__


def content_disposition(filename: str) -> str:
    """An attachment disposition safe for any filename (RFC 6266 / 5987)."""
    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "'").replace("\\", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"
