"""Uploads (client), attachments (client and agent), and the local-disk storage endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from litestar.response import File
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.domain.attachments.schemas import (
    AttachmentOut,
    UploadComplete,
    UploadCreate,
    UploadCreated,
    UploadStatus,
)
from tellback_server.domain.attachments.services import AttachmentService, accepts_bytes
from tellback_server.http import examples
from tellback_server.http.deps import (
    AGENT,
    AGENT_AUTH,
    CLIENT,
    CLIENT_AUTH,
    AgentPrincipal,
    ClientPrincipal,
    app_state,
)
from tellback_server.http.errors import (
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    problem_response,
)
from tellback_server.http.idempotency import IdempotencyKeyHeader, idempotent
from tellback_server.http.openapi import example_body
from tellback_server.storage.local import BadSignature, LocalStore, TooLarge


def provide_attachments(
    request: Request[Any, Any, Any], db: NamedDependency[AsyncSession]
) -> AttachmentService:
    return AttachmentService(db, app_state(request).store)


ATTACHMENTS = {"attachments": Provide(provide_attachments, sync_to_thread=False)}


class ClientUploadsController(Controller):
    path = "/v1/client"
    tags = ["client"]
    security = [{"sessionToken": []}]
    dependencies = {**CLIENT, **ATTACHMENTS}
    middleware = CLIENT_AUTH

    @post("/uploads", status_code=201, response_model=UploadCreated, summary="Start an upload")
    async def create_upload(
        self,
        request: Request[Any, Any, Any],
        db: NamedDependency[AsyncSession],
        client: NamedDependency[ClientPrincipal],
        attachments: NamedDependency[AttachmentService],
        data: Annotated[UploadCreate, example_body("A 2.4 MB photo", examples.UPLOAD_CREATE)],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[bytes]:
        """Checks kind, size and content type against the app's limits (413/415), then
        returns where to PUT the bytes: one URL (`single`, up to 16 MiB) or one URL per
        part (`multipart`). Send an `Idempotency-Key`."""
        return await idempotent(
            idempotency_key,
            request,
            db,
            client.scope,
            201,
            lambda _: attachments.create_upload(client, data),
        )

    @get("/uploads/{upload_id:uuid}", summary="Upload state, for resuming")
    async def get_upload(
        self,
        client: NamedDependency[ClientPrincipal],
        attachments: NamedDependency[AttachmentService],
        upload_id: FromPath[UUID],
    ) -> UploadStatus:
        """Lists the parts storage already holds and fresh URLs for the rest, so a client
        resumes after a crash or network loss without resending finished parts."""
        return await attachments.upload_status(client, upload_id)

    @post("/uploads/{upload_id:uuid}/complete", status_code=200, summary="Finish an upload")
    async def complete_upload(
        self,
        request: Request[Any, Any, Any],
        client: NamedDependency[ClientPrincipal],
        attachments: NamedDependency[AttachmentService],
        upload_id: FromPath[UUID],
        data: JSONBody[UploadComplete | None] = None,
    ) -> Response[Any]:
        """Verifies size (409 `upload_incomplete`) and content type (415, the upload is
        rejected and its bytes deleted), then queues processing."""
        out, rejected = await attachments.complete(client, upload_id, data or UploadComplete())
        if rejected is not None:
            return problem_response(request, 415, "unsupported_media_type", rejected)
        return Response(content=out)

    @delete("/uploads/{upload_id:uuid}", status_code=204, summary="Abort an upload")
    async def abort_upload(
        self,
        client: NamedDependency[ClientPrincipal],
        attachments: NamedDependency[AttachmentService],
        upload_id: FromPath[UUID],
    ) -> None:
        await attachments.abort(client, upload_id)

    @get("/attachments/{attachment_id:uuid}", summary="An attachment with download URLs")
    async def get_attachment(
        self,
        client: NamedDependency[ClientPrincipal],
        attachments: NamedDependency[AttachmentService],
        attachment_id: FromPath[UUID],
    ) -> AttachmentOut:
        """URLs are valid for 15 minutes (`expires_at`); fetch again for fresh ones."""
        return await attachments.get_for_client(client, attachment_id)


class AgentAttachmentsController(Controller):
    path = "/v1/agent/attachments"
    tags = ["agent"]
    security = [{"agentToken": []}]
    dependencies = {**AGENT, **ATTACHMENTS}
    middleware = AGENT_AUTH

    @get("/{attachment_id:uuid}", summary="An attachment with download URLs")
    async def get_attachment(
        self,
        agent: NamedDependency[AgentPrincipal],
        attachments: NamedDependency[AttachmentService],
        attachment_id: FromPath[UUID],
    ) -> AttachmentOut:
        return await attachments.get_for_agent(agent, attachment_id)


def _local_store(request: Request[Any, Any, Any]) -> LocalStore:
    store = app_state(request).store
    if not isinstance(store, LocalStore):
        raise NotFound("no such resource")
    return store


UPLOAD_IDLE_SECONDS = 60.0
# Apache's mod_reqtimeout rule against a body trickled a byte at a time (each byte
# resetting the idle clock): the body's time is UPLOAD_GRACE_SECONDS, plus a second for
# every UPLOAD_MIN_RATE bytes received. 500 B/s is 4 kbit/s, below any working mobile link.
UPLOAD_GRACE_SECONDS = 60.0
UPLOAD_MIN_RATE = 500


async def _idle_limited(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body's chunks, ending with 408 a sender that stalls or trickles (slowloris).

    A held upload keeps a socket and an open file; S3 servers cut such clients too.
    """
    it = chunks.__aiter__()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UPLOAD_GRACE_SECONDS
    while True:
        left = deadline - loop.time()
        try:
            chunk = await asyncio.wait_for(it.__anext__(), min(UPLOAD_IDLE_SECONDS, left))
        except StopAsyncIteration:
            return
        except TimeoutError:
            if left < UPLOAD_IDLE_SECONDS:
                raise RequestTimeout(
                    f"the body came slower than {UPLOAD_MIN_RATE} bytes a second; resume the upload"
                ) from None
            raise RequestTimeout(
                f"no bytes for {UPLOAD_IDLE_SECONDS:g} s; resume the upload"
            ) from None
        deadline += len(chunk) / UPLOAD_MIN_RATE
        yield chunk


class StorageController(Controller):
    """Signed, expiring upload/download URLs of the local-disk store (embedded default)."""

    path = "/v1/storage"
    tags = ["storage"]
    include_in_schema = False

    @put("/{key:path}", status_code=200, request_max_body_size=None)
    async def put_object(
        self, request: Request[Any, Any, Any], key: FromPath[str]
    ) -> Response[None]:
        store = _local_store(request)
        try:
            signed = store.verify(key.lstrip("/"), dict(request.query_params), "put")
        except BadSignature as exc:
            raise Forbidden(str(exc)) from None
        if not await accepts_bytes(app_state(request).db, signed.key):
            raise Forbidden("this upload is completed or gone; its URLs take no more bytes")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > signed.max_size:
            raise PayloadTooLarge(f"at most {signed.max_size} bytes may be sent to this URL")
        try:
            etag = await store.receive(signed, _idle_limited(request.stream()))
        except TooLarge as exc:
            raise PayloadTooLarge(str(exc)) from None
        except BadSignature as exc:
            raise Forbidden(str(exc)) from None
        return Response(content=None, headers={"ETag": f'"{etag}"'})

    @get("/{key:path}")
    async def get_object(self, request: Request[Any, Any, Any], key: FromPath[str]) -> File:
        store = _local_store(request)
        try:
            signed = store.verify(key.lstrip("/"), dict(request.query_params), "get")
        except BadSignature as exc:
            raise Forbidden(str(exc)) from None
        path = store.path(signed.key)
        if not path.is_file():
            raise NotFound("no such object")
        return File(
            path=path,
            # Uploaded bytes are untrusted: never sniffed into HTML, never run as a page.
            headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"},
            filename=signed.filename or path.name,
            media_type=signed.content_type or "application/octet-stream",
            content_disposition_type="attachment" if signed.filename else "inline",
        )
