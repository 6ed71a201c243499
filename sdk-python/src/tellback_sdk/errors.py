"""Every error the SDK raises.

::

    TellbackError
     ├── APIError                          something went wrong talking to the server
     │    ├── APIConnectionError           no response: refused, reset, DNS, TLS
     │    │    └── APITimeoutError         no response in time
     │    └── APIStatusError               a 4xx/5xx problem+json response
     │         ├── BadRequestError               400
     │         ├── AuthenticationError           401 (after one session renewal)
     │         ├── PermissionDeniedError         403
     │         ├── NotFoundError                 404
     │         ├── ConflictError                 409
     │         │    ├── IdempotencyKeyReusedError      idempotency_key_reused
     │         │    ├── IdempotencyKeyInProgressError  idempotency_key_in_progress
     │         │    ├── UploadIncompleteError          upload_incomplete
     │         │    └── ConversationClosedError        conversation_closed
     │         ├── PayloadTooLargeError          413
     │         ├── UnsupportedMediaTypeError     415
     │         ├── UnprocessableEntityError      422 (``.errors``: the offending fields)
     │         ├── RateLimitError                429 (``.retry_after``)
     │         └── InternalServerError           5xx
     │              └── ServiceUnavailableError  503 (``.retry_after``)
     ├── AttachmentLimitError              refused locally, before any byte was sent
     │    ├── AttachmentTooLargeError
     │    ├── AttachmentTypeNotAllowedError
     │    └── AttachmentEmptyError         a 0-byte file (the server takes 1 byte or more)
     ├── IdentityRequiredError             an identified session expired and no user_token
     │                                     is at hand to renew it (pass one, or identify())
     └── OutboxError                       misuse of the offline outbox
          └── UserChangedError             the user logged out while the item was queued

Unknown error ``code`` values map by HTTP status (sdk-spec/errors.md), so a new
server code never breaks a caller that catches the status class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from tellback_sdk._retry import parse_retry_after

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AttachmentEmptyError",
    "AttachmentLimitError",
    "AttachmentTooLargeError",
    "AttachmentTypeNotAllowedError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "ConversationClosedError",
    "FieldError",
    "IdempotencyKeyInProgressError",
    "IdempotencyKeyReusedError",
    "IdentityRequiredError",
    "InternalServerError",
    "NotFoundError",
    "OutboxError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "TellbackError",
    "UnprocessableEntityError",
    "UnsupportedMediaTypeError",
    "UploadIncompleteError",
    "UserChangedError",
    "make_status_error",
]


class TellbackError(Exception):
    """Base of every SDK error."""


class APIError(TellbackError):
    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APIConnectionError(APIError):
    def __init__(
        self, message: str = "connection error", *, request: httpx.Request | None = None
    ) -> None:
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    def __init__(self, *, request: httpx.Request | None = None) -> None:
        super().__init__("request timed out", request=request)


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str


class APIStatusError(APIError):
    """A problem+json answer. ``code`` is the stable machine code (None if the body had none,
    e.g. an S3 error on a presigned URL); ``request_id`` is what support asks for."""

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        body: Any,
        code: str | None,
        request_id: str | None,
    ) -> None:
        super().__init__(message, request=response.request)
        self.response = response
        self.status_code = response.status_code
        self.body = body
        self.code = code
        self.request_id = request_id
        self.detail: str | None = body.get("detail") if isinstance(body, dict) else None

    def __str__(self) -> str:
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.status_code} {self.code or 'error'}: {self.message}{rid}"


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class IdempotencyKeyReusedError(ConflictError):
    """Same key, different body: an SDK bug, never retried."""


class IdempotencyKeyInProgressError(ConflictError):
    """Retried automatically; raised only when the retry budget ran out."""


class UploadIncompleteError(ConflictError):
    pass


class ConversationClosedError(ConflictError):
    """A reply to a closed conversation: offer the user to start a new one."""


class PayloadTooLargeError(APIStatusError):
    pass


class UnsupportedMediaTypeError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        raw = self.body.get("errors") if isinstance(self.body, dict) else None
        self.errors: list[FieldError] = [
            FieldError(str(e.get("field", "")), str(e.get("message", "")))
            for e in (raw or [])
            if isinstance(e, dict)
        ]


class _RetryAfterMixin(APIStatusError):
    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.response.headers)


class RateLimitError(_RetryAfterMixin):
    pass


class InternalServerError(APIStatusError):
    pass


class ServiceUnavailableError(InternalServerError, _RetryAfterMixin):
    pass


class AttachmentLimitError(TellbackError):
    """The app's limits (GET /v1/client/config) refuse this file; nothing was uploaded."""

    def __init__(self, message: str, *, kind: str, size: int, content_type: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.size = size
        self.content_type = content_type


class AttachmentTooLargeError(AttachmentLimitError):
    def __init__(self, *, kind: str, size: int, content_type: str, max_bytes: int) -> None:
        super().__init__(
            f"a {kind} may be at most {max_bytes} bytes; this one has {size}",
            kind=kind,
            size=size,
            content_type=content_type,
        )
        self.max_bytes = max_bytes


class AttachmentTypeNotAllowedError(AttachmentLimitError):
    def __init__(self, *, kind: str, size: int, content_type: str, allowed: list[str]) -> None:
        super().__init__(
            f"{content_type} is not allowed for a {kind} (allowed: {', '.join(allowed)})",
            kind=kind,
            size=size,
            content_type=content_type,
        )
        self.allowed = allowed


class AttachmentEmptyError(AttachmentLimitError):
    def __init__(self, *, filename: str, kind: str, content_type: str) -> None:
        super().__init__(
            f"{filename} is empty: an attachment must have at least 1 byte",
            kind=kind,
            size=0,
            content_type=content_type,
        )
        self.filename = filename


class OutboxError(TellbackError):
    pass


class UserChangedError(OutboxError):
    """The user logged out (or another user was identified) on another thread while
    this item was being queued: it was not queued, because it must never be sent as,
    or shown to, the next user. Nothing was sent."""

    def __init__(self) -> None:
        super().__init__("the user logged out while this item was being queued; not queued")


class IdentityRequiredError(TellbackError):
    """Renewing silently as anonymous would log the user out, so the SDK refuses."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}
_BY_CODE: dict[str, type[APIStatusError]] = {
    "idempotency_key_reused": IdempotencyKeyReusedError,
    "idempotency_key_in_progress": IdempotencyKeyInProgressError,
    "upload_incomplete": UploadIncompleteError,
    "conversation_closed": ConversationClosedError,
}


def _error_class(status: int, code: str | None) -> type[APIStatusError]:
    by_code = _BY_CODE.get(code or "")
    if by_code is not None and _BY_STATUS.get(status) in by_code.__mro__:
        return by_code
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return InternalServerError if status >= 500 else APIStatusError


def make_status_error(response: httpx.Response) -> APIStatusError:
    """The typed error for a non-2xx response (the body must already be read)."""
    body: Any
    try:
        body = response.json()
    except ValueError:
        body = response.text or None
    problem: Mapping[str, Any] = body if isinstance(body, dict) else {}
    code = problem.get("code") if isinstance(problem.get("code"), str) else None
    request_id = response.headers.get("x-request-id") or problem.get("request_id")
    message = str(problem.get("detail") or problem.get("title") or response.reason_phrase)
    cls = _error_class(response.status_code, code)
    return cls(message, response=response, body=body, code=code, request_id=request_id)
