"""One error tree, rendered as RFC 9457 problem+json in one place.

Every 4xx/5xx leaves the server through :func:`problem_response`. Database
connectivity failures become 503 (never 409 or 500), and a 5xx body never
carries exception text, SQL or a stack trace.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

import asyncpg
import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    SerializationException,
    ValidationException,
)
from litestar.types import ExceptionHandlersMap
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from tellback_server.db.engine import AfterGroupCommit
from tellback_server.storage.base import StorageError

log = structlog.get_logger("tellback.http")

PROBLEM_JSON = "application/problem+json"


class FieldError(msgspec.Struct):
    field: str
    message: str


class Problem(msgspec.Struct, omit_defaults=True):
    """An RFC 9457 problem document with Tellback's stable ``code``."""

    type: str
    title: str
    status: int
    code: str
    detail: str | None = None
    errors: list[FieldError] | None = None
    request_id: str | None = None


class AppError(Exception):
    status_code: int = 500
    code: str = "internal_error"
    retry_after: int | None = None

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: list[FieldError] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(detail or self.code)
        self.detail = detail
        self.errors = errors
        if retry_after is not None:
            self.retry_after = retry_after


class BadRequest(AppError):
    status_code, code = 400, "bad_request"


class Unauthenticated(AppError):
    status_code, code = 401, "unauthenticated"


class Forbidden(AppError):
    status_code, code = 403, "forbidden"


class NotFound(AppError):
    status_code, code = 404, "not_found"


class IdempotencyKeyReused(AppError, AfterGroupCommit):
    # Seen in an earlier member's row of the same SQLite write group, it holds only
    # once that group has committed (see AfterGroupCommit).
    status_code, code = 409, "idempotency_key_reused"


class IdempotencyKeyInProgress(AppError):
    status_code, code = 409, "idempotency_key_in_progress"
    retry_after = 1


class Replay(AfterGroupCommit):
    """Answer with a response stored before (an idempotent create's key was taken):
    raised, so the request's own work rolls back with its transaction."""

    def __init__(self, response: Response[bytes]) -> None:
        super().__init__("replayed")
        self.response = response


def _replay(_request: Request[Any, Any, Any], exc: Replay) -> Response[bytes]:
    return exc.response


class PayloadTooLarge(AppError):
    status_code, code = 413, "payload_too_large"


class UnsupportedMediaType(AppError):
    status_code, code = 415, "unsupported_media_type"


class ValidationFailed(AppError):
    status_code, code = 422, "validation_failed"

    @classmethod
    def field(cls, field: str, message: str) -> ValidationFailed:
        return cls(f"{field}: {message}", errors=[FieldError(field=field, message=message)])


class RequestTimeout(AppError):
    status_code, code = 408, "request_timeout"


class RateLimited(AppError):
    status_code, code = 429, "rate_limited"


class ServiceUnavailable(AppError):
    status_code, code = 503, "service_unavailable"
    retry_after = 5


class StorageUnavailable(AppError):
    status_code, code = 503, "storage_unavailable"
    retry_after = 5


_encoder = msgspec.json.Encoder()


def problem_response(
    request: Request[Any, Any, Any] | None,
    status: int,
    code: str,
    detail: str | None = None,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    request_id = request.scope.get("state", {}).get("request_id") if request is not None else None
    body = Problem(
        type="about:blank",
        title=HTTPStatus(status).phrase,
        status=status,
        code=code,
        detail=detail,
        errors=errors,
        request_id=request_id,
    )
    return Response(
        content=_encoder.encode(body),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _app_error(request: Request[Any, Any, Any], exc: AppError) -> Response[bytes]:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    if exc.status_code >= 500:
        log.warning("http.app_error", code=exc.code, status=exc.status_code)
    return problem_response(
        request, exc.status_code, exc.code, exc.detail, errors=exc.errors, headers=headers
    )


_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")


def _field_name(key: str, message: str) -> str:
    """The request's own field path: Litestar names the whole body `data`."""
    key = key.removeprefix("$.")
    if key == "data" or key.startswith("data."):
        key = key.removeprefix("data").lstrip(".")
    if (missing := _MISSING_FIELD.search(message)) is not None:
        key = f"{key}.{missing.group(1)}" if key else missing.group(1)
    return key or "body"


def _validation_errors(extra: Any) -> list[FieldError]:
    errors: list[FieldError] = []
    if isinstance(extra, list):
        for item in extra:
            if not isinstance(item, dict):
                continue
            message = str(item.get("message") or "invalid value")
            field = _field_name(str(item.get("key") or ""), message)
            errors.append(FieldError(field=field, message=message))
    return errors


def _body_missing(exc: ValidationException) -> bool:
    """Litestar reports an empty body as a missing `data` argument (a KeyError text)."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    return any(
        isinstance(item, dict)
        and item.get("key") == "data"
        and "'data'" in str(item.get("message"))
        for item in extra
    )


def _is_malformed(exc: BaseException) -> bool:
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, msgspec.DecodeError) and not isinstance(
            cause, msgspec.ValidationError
        ):
            return True
        cause = cause.__cause__
    return "malformed" in str(getattr(exc, "detail", "")).lower()


def _litestar_validation(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[bytes]:
    if _is_malformed(exc):
        return problem_response(request, 400, "bad_request", "the request body is not valid JSON")
    if _body_missing(exc):
        return problem_response(request, 400, "bad_request", "a JSON request body is required")
    errors = _validation_errors(exc.extra)
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors) or "the request is invalid"
    return problem_response(request, 422, "validation_failed", detail, errors=errors or None)


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    mapping = {
        400: "bad_request",
        401: "unauthenticated",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
        415: "unsupported_media_type",
        429: "rate_limited",
    }
    code = mapping.get(status, "internal_error" if status >= 500 else "bad_request")
    if isinstance(exc, NotFoundException):
        detail: str | None = "no such resource"
    elif isinstance(exc, MethodNotAllowedException):
        detail = "method not allowed on this resource"
    elif isinstance(exc, NotAuthorizedException | PermissionDeniedException):
        detail = exc.detail
    elif status == 413:
        detail = "the request body is too large"
    elif status >= 500:
        if "disconnected" in (exc.detail or ""):
            # The client went away mid-body (Litestar says 500; nobody reads the answer).
            log.info("http.client_disconnected")
        else:
            # Litestar's own 5xx (e.g. a dependency it could not resolve): ours to fix.
            log.error("http.framework_error", status=status, error=exc.detail, exc_info=exc)
        detail = None
    else:
        detail = exc.detail
    headers = dict(exc.headers or {})
    return problem_response(request, status, code, detail, headers=headers or None)


def _serialization(request: Request[Any, Any, Any], exc: SerializationException) -> Response[bytes]:
    return problem_response(request, 400, "bad_request", "the request body is not valid JSON")


_UNAVAILABLE_HINTS = (
    "database is locked",
    "unable to open database",
    "disk i/o error",
    "connection is closed",
    "connection was closed",
    "connectiondoesnotexist",
    "cannot connect now",
    "too many connections",
    "terminating connection",
    "the database system is",
    "server closed the connection",
    # asyncpg on a connection the server dropped mid-operation
    "interfaceerror",
    "internalclienterror",
    "another operation",
    "not currently accepting connections",
)


def is_database_unavailable(exc: BaseException) -> bool:
    """True for outages (retry later), False for bugs such as a missing column."""
    if isinstance(exc, DisconnectionError | PoolTimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        return _hinted(exc.orig)
    # asyncpg's own client errors on a connection the server dropped mid-operation.
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        return True
    # Raised on connect before SQLAlchemy can wrap them: socket errors, and refusals
    # such as "database ... is not currently accepting connections".
    if isinstance(exc, asyncpg.PostgresError):
        return _hinted(exc)
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    # Any other socket error while connecting: the server's Unix socket gone while it
    # restarts (FileNotFoundError), no route to its host, a name that does not resolve.
    return isinstance(exc, OSError) and _raised_connecting(exc)


def _raised_connecting(exc: BaseException) -> bool:
    """Whether ``exc`` came out of asyncpg's connect (an OSError elsewhere is a bug)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == "asyncpg.connect_utils":
            return True
        tb = tb.tb_next
    return False


def brief_db_error(exc: BaseException) -> str:
    """The driver's own message for ``exc`` (not SQLAlchemy's, which quotes the SQL): for
    one-line logs of a database that is away."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return f"{type(cause).__name__}: {cause}"[:500]


def _hinted(orig: BaseException | None) -> bool:
    text = f"{type(orig).__name__} {orig}".lower()
    return any(hint in text for hint in _UNAVAILABLE_HINTS)


# PostgreSQL gave up on the transaction because of another one (a deadlock between
# writes of the same rows, a serialization failure): nothing was written, and the
# same request sent again succeeds. Lock order keeps these rare (identity/services.py
# `lock_end_users`); they are answered as the outage they are to the caller.
_COLLISIONS = frozenset({"40P01", "40001"})


def is_collision(exc: BaseException) -> bool:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return getattr(orig, "sqlstate", None) in _COLLISIONS


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if is_collision(exc):
        log.warning("db.collision", error=brief_db_error(exc))
        return problem_response(
            request,
            503,
            "service_unavailable",
            "the request collided with another one changing the same data; retry it",
            headers={"Retry-After": "1"},
        )
    if is_database_unavailable(exc):
        # One line, no traceback: an outage fails every request until it ends, and a
        # rendered traceback each (about 0.7 s on a console) would hold the server up.
        log.error("db.unavailable", error_type=type(exc).__name__, error=brief_db_error(exc))
        return problem_response(
            request,
            503,
            "service_unavailable",
            "the database is unavailable; retry shortly",
            headers={"Retry-After": "5"},
        )
    log.error("http.unhandled_error", error_type=type(exc).__name__, exc_info=exc)
    return problem_response(request, 500, "internal_error", "an internal error occurred")


def _storage(request: Request[Any, Any, Any], exc: StorageError) -> Response[bytes]:
    log.error("storage.unavailable", error=str(exc))
    return problem_response(
        request,
        503,
        "storage_unavailable",
        "object storage is unavailable; retry shortly",
        headers={"Retry-After": "5"},
    )


def _too_deep(request: Request[Any, Any, Any], _exc: RecursionError) -> Response[bytes]:
    # msgspec decodes recursively: absurdly nested JSON exhausts the stack.
    return problem_response(request, 400, "bad_request", "the JSON body is nested too deeply")


def exception_handlers() -> ExceptionHandlersMap:
    return {
        RecursionError: _too_deep,
        Replay: _replay,
        AppError: _app_error,
        StorageError: _storage,
        ValidationException: _litestar_validation,
        SerializationException: _serialization,
        HTTPException: _http_exception,
        Exception: _unexpected,
    }
