"""Uploads and attachments: limits checked first, single or multipart per the server's
plan, parts streamed from disk, resumable across restarts (sdk-spec/uploads.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from tellback_sdk._core import RequestSpec, decode, encode
from tellback_sdk._uploads import (
    Part,
    Progress,
    Source,
    UploadInput,
    UploadJob,
    check_limits,
    guess_content_type,
    kind_for,
    plan_parts,
)
from tellback_sdk.errors import NotFoundError, PermissionDeniedError, UploadIncompleteError
from tellback_sdk.resources._base import AsyncAPIResource, SyncAPIResource
from tellback_sdk.types import Attachment, UploadCreated, UploadedPart, UploadStatus

ProgressCallback = Callable[[int, int], Any]
# A pass ends early when URLs expired (403), parts went missing (409) or the upload was
# forgotten (404); each pass refreshes from the server. Three passes cover a stale replay.
PASSES = 3
PART_CONCURRENCY = 3
DONE = frozenset({"processing", "ready", "rejected"})

Step = Attachment | tuple[list[Part], list[UploadedPart], bool]


def _prepared(src: Source, kind: str | None, content_type: str | None) -> tuple[str, str]:
    ct = (content_type or guess_content_type(src.filename)).lower()
    return kind or kind_for(ct, src.filename), ct


def _create_spec(job: UploadJob, src: Source, kind: str, ct: str) -> RequestSpec:
    body = {"filename": src.filename, "content_type": ct, "size": src.size, "kind": kind}
    return RequestSpec.create("/v1/client/uploads", body, job.idempotency_key)


def _status_spec(upload_id: str) -> RequestSpec:
    return RequestSpec("GET", f"/v1/client/uploads/{upload_id}")


def _complete_spec(
    job: UploadJob, server_parts: list[UploadedPart], multipart: bool
) -> RequestSpec:
    # Completing twice returns the same attachment, so this POST may be repeated.
    body = encode(job.complete_body(server_parts, multipart))
    return RequestSpec(
        "POST", f"/v1/client/uploads/{job.upload_id}/complete", content=body, safe_to_repeat=True
    )


def _put_spec(part: Part, content: Any) -> RequestSpec:
    headers = {**part.headers, "Content-Length": str(part.length)}
    return RequestSpec("PUT", part.url, content=content, auth=False, headers=headers)


def _step_from_status(job: UploadJob, st: UploadStatus) -> Step | None:
    if st.status == "pending":
        return (
            plan_parts(st.size, st.single, st.multipart),
            st.uploaded_parts,
            st.method == "multipart",
        )
    if st.status not in DONE:
        job.restart()  # expired or aborted
    return None


class Attachments(SyncAPIResource):
    def get(self, attachment_id: str) -> Attachment:
        spec = RequestSpec("GET", f"/v1/client/attachments/{attachment_id}")
        return decode(self._client._call(spec), Attachment)

    def abort(self, upload_id: str) -> None:
        self._client._call(RequestSpec("DELETE", f"/v1/client/uploads/{upload_id}"))

    def upload(
        self,
        data: UploadInput,
        *,
        kind: str | None = None,
        content_type: str | None = None,
        filename: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Attachment:
        """Upload a file path, bytes or a binary file object and return the attachment
        (``status`` ``processing``). Raises AttachmentLimitError before sending anything
        when the app's limits refuse the file."""
        src = Source(data, filename)
        kind, ct = _prepared(src, kind, content_type)
        check_limits(self._client.config.get(), kind, src.size, ct, src.filename)
        job = UploadJob(self._core.store, self._core.owner, src.resume_key(kind, ct))
        error: Exception | None = None
        for _ in range(PASSES):
            step = self._prepare(job, src, kind, ct)
            if isinstance(step, Attachment):
                job.finished()
                return step
            parts, server_parts, multipart = step
            progress = Progress(src.size, on_progress)
            progress.skip(sum(p.size for p in server_parts))
            try:
                for part in parts:
                    self._put(job, src, part, progress)
                attachment = decode(
                    self._client._call(_complete_spec(job, server_parts, multipart)), Attachment
                )
            except (PermissionDeniedError, UploadIncompleteError) as exc:
                error = exc
                continue
            except NotFoundError as exc:
                error = exc
                job.restart()
                continue
            job.finished()
            return attachment
        assert error is not None
        raise error

    def _prepare(self, job: UploadJob, src: Source, kind: str, ct: str) -> Step:
        if job.upload_id is not None:
            try:
                st = decode(self._client._call(_status_spec(job.upload_id)), UploadStatus)
            except NotFoundError:
                job.restart()
            else:
                step = _step_from_status(job, st)
                if step is not None:
                    return step
                if st.status in DONE:
                    return self.get(st.upload_id)
        created = decode(self._client._call(_create_spec(job, src, kind, ct)), UploadCreated)
        job.started(created.upload_id)
        return (
            plan_parts(src.size, created.single, created.multipart),
            [],
            created.method == "multipart",
        )

    def _put(self, job: UploadJob, src: Source, part: Part, progress: Progress) -> None:
        def body() -> Iterator[bytes]:
            progress.start_part(part.number)
            for chunk in src.chunks(part.offset, part.length):
                progress.advance(part.number, len(chunk))
                yield chunk

        response = self._client._call(_put_spec(part, body))
        progress.finish_part(part.number, part.length)
        if etag := response.headers.get("etag"):
            job.part_done(part.number, etag)


class AsyncAttachments(AsyncAPIResource):
    async def get(self, attachment_id: str) -> Attachment:
        spec = RequestSpec("GET", f"/v1/client/attachments/{attachment_id}")
        return decode(await self._client._call(spec), Attachment)

    async def abort(self, upload_id: str) -> None:
        await self._client._call(RequestSpec("DELETE", f"/v1/client/uploads/{upload_id}"))

    async def upload(
        self,
        data: UploadInput,
        *,
        kind: str | None = None,
        content_type: str | None = None,
        filename: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Attachment:
        """As ``Client.attachments.upload``; parts go up to three at a time."""
        src = await asyncio.to_thread(Source, data, filename)
        kind, ct = _prepared(src, kind, content_type)
        check_limits(await self._client.config.get(), kind, src.size, ct, src.filename)
        job = UploadJob(self._core.store, self._core.owner, src.resume_key(kind, ct))
        error: Exception | None = None
        for _ in range(PASSES):
            step = await self._prepare(job, src, kind, ct)
            if isinstance(step, Attachment):
                job.finished()
                return step
            parts, server_parts, multipart = step
            progress = Progress(src.size, on_progress)
            progress.skip(sum(p.size for p in server_parts))
            try:
                await self._put_all(job, src, parts, progress)
                response = await self._client._call(_complete_spec(job, server_parts, multipart))
            except (PermissionDeniedError, UploadIncompleteError) as exc:
                error = exc
                continue
            except NotFoundError as exc:
                error = exc
                job.restart()
                continue
            job.finished()
            return decode(response, Attachment)
        assert error is not None
        raise error

    async def _prepare(self, job: UploadJob, src: Source, kind: str, ct: str) -> Step:
        if job.upload_id is not None:
            try:
                st = decode(await self._client._call(_status_spec(job.upload_id)), UploadStatus)
            except NotFoundError:
                job.restart()
            else:
                step = _step_from_status(job, st)
                if step is not None:
                    return step
                if st.status in DONE:
                    return await self.get(st.upload_id)
        response = await self._client._call(_create_spec(job, src, kind, ct))
        created = decode(response, UploadCreated)
        job.started(created.upload_id)
        return (
            plan_parts(src.size, created.single, created.multipart),
            [],
            created.method == "multipart",
        )

    async def _put_all(
        self, job: UploadJob, src: Source, parts: list[Part], progress: Progress
    ) -> None:
        limit = asyncio.Semaphore(PART_CONCURRENCY)

        async def one(part: Part) -> None:
            async with limit:
                await self._put(job, src, part, progress)

        try:
            async with asyncio.TaskGroup() as tg:
                for part in parts:
                    tg.create_task(one(part))
        except BaseExceptionGroup as group:
            # Callers handle one error like the sync path: the first is representative.
            raise group.exceptions[0] from None

    async def _put(self, job: UploadJob, src: Source, part: Part, progress: Progress) -> None:
        async def body() -> AsyncIterator[bytes]:
            progress.start_part(part.number)
            offset, end = part.offset, part.offset + part.length
            while offset < end:
                chunk = await asyncio.to_thread(src.read, offset, min(256 * 1024, end - offset))
                if not chunk:
                    raise OSError("the file shrank while it was being uploaded")
                offset += len(chunk)
                progress.advance(part.number, len(chunk))
                yield chunk

        response = await self._client._call(_put_spec(part, body))
        progress.finish_part(part.number, part.length)
        if etag := response.headers.get("etag"):
            job.part_done(part.number, etag)
