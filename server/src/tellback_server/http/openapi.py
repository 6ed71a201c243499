"""Make the OpenAPI document complete enough for client generators.

Every ``/v1`` operation gets its problem+json error responses (with an example
each), chosen from what the route can actually answer: 401 behind a guard, 404
with a path id, 409 on idempotent creates, 413/415/422 with a body, 429 where
rate limits apply, 503 everywhere (database or storage outage). Handlers that
build their own response (idempotent creates return stored bytes) declare
their real success model as ``response_model``; it replaces the ``string``
Litestar would infer. Every response declares the headers clients act on
(:data:`RESPONSE_HEADERS`): ``X-Request-Id``, ``Retry-After`` on 409/429/503,
``Idempotent-Replayed`` on an idempotent create's success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar.enums import RequestEncodingType
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example, OpenAPIHeader, Operation, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import BodyKwarg

from tellback_server.http.deps import Authenticate
from tellback_server.http.errors import Problem

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

#: Response headers, declared once in ``components.headers`` and referenced by each
#: response that carries them.
RESPONSE_HEADERS = {
    "X-Request-Id": OpenAPIHeader(
        schema=Schema(type=OpenAPIType.STRING),
        description="The request's id: the caller's own `X-Request-Id` when it is 1-128 "
        "letters, digits or `._:-`, otherwise a new one. A problem's `request_id` is the "
        "same value; quote it in support requests.",
    ),
    "Retry-After": OpenAPIHeader(
        schema=Schema(type=OpenAPIType.INTEGER, minimum=0),
        description="Seconds to wait before trying again (`rate_limited`, "
        "`service_unavailable`, `storage_unavailable`, `idempotency_key_in_progress`).",
    ),
    "Idempotent-Replayed": OpenAPIHeader(
        schema=Schema(type=OpenAPIType.STRING, enum=["true"]),
        description="`true` when this is the stored answer to an earlier request with the "
        "same `Idempotency-Key` and body: nothing new was created.",
    ),
}
_RETRY_AFTER_STATUSES = frozenset({"409", "429", "503"})


@dataclass(frozen=True, slots=True)
class _Error:
    status: int
    title: str
    code: str
    detail: str
    description: str
    extra: dict[str, Any] | None = None

    def spec(self) -> ResponseSpec:
        value: dict[str, Any] = {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
            **(self.extra or {}),
            "request_id": "5f0c3a9e2b7d4c18a6e1f0b2c3d4e5f6",
        }
        return ResponseSpec(
            data_container=Problem,
            media_type="application/problem+json",
            description=self.description,
            generate_examples=False,
            examples=[Example(summary=self.code, value=value)],
        )


BAD_REQUEST = _Error(
    400,
    "Bad Request",
    "bad_request",
    "the body is not valid JSON",
    "Malformed JSON or header, a bad cursor, `%00` in the URL (`bad_request`)",
)
UNAUTHENTICATED = _Error(
    401,
    "Unauthorized",
    "unauthenticated",
    "the session is not valid or has expired; create a new session",
    "Missing, wrong or expired credential (`unauthenticated`)",
)
NOT_FOUND = _Error(
    404,
    "Not Found",
    "not_found",
    "no such conversation",
    "Unknown id, or one of another app or user (`not_found`)",
)
CONFLICT = _Error(
    409,
    "Conflict",
    "idempotency_key_reused",
    "this Idempotency-Key was used with a different request body",
    "`idempotency_key_reused`, `idempotency_key_in_progress`, or a state conflict "
    "(`conversation_closed`, `upload_incomplete`, `delivery_pending`)",
)
TOO_LARGE = _Error(
    413,
    "Content Too Large",
    "payload_too_large",
    "the request body is larger than 1048576 bytes",
    "Body or declared upload larger than allowed (`payload_too_large`)",
)
UNSUPPORTED = _Error(
    415,
    "Unsupported Media Type",
    "unsupported_media_type",
    "the body must be application/json",
    "Wrong content type, or an upload whose bytes are not its type (`unsupported_media_type`)",
)
INVALID = _Error(
    422,
    "Unprocessable Content",
    "validation_failed",
    "custom field 'order_id' must be a string",
    "A field failed validation (`validation_failed`, with `errors`)",
    {"errors": [{"field": "custom_fields.order_id", "message": "expected str"}]},
)
RATE_LIMITED = _Error(
    429,
    "Too Many Requests",
    "rate_limited",
    "too many requests; retry after the given delay",
    "Over the app's or user's rate limit (`rate_limited`; see `Retry-After`)",
)
UNAVAILABLE = _Error(
    503,
    "Service Unavailable",
    "service_unavailable",
    "the database is unavailable; retry shortly",
    "Database or storage outage (`service_unavailable`, `storage_unavailable`; see `Retry-After`)",
)


def _errors(handler: HTTPRouteHandler, path: str) -> list[_Error]:
    methods = set(handler.http_methods)
    errors = [BAD_REQUEST]
    # Sessions are unauthenticated but refuse an unknown app key or identity token with 401.
    authenticated = any(isinstance(m, Authenticate) for m in handler.resolve_middleware())
    if authenticated or path == "/v1/client/sessions":
        errors.append(UNAUTHENTICATED)
    if "{" in path:
        errors.append(NOT_FOUND)
    if methods & _BODY_METHODS:
        errors += [CONFLICT, TOO_LARGE, UNSUPPORTED, INVALID]
    elif handler.parsed_fn_signature.parameters.keys() - {"self"}:
        errors.append(INVALID)  # query parameters are validated too
    if path.startswith("/v1/client"):
        errors.append(RATE_LIMITED)
    errors.append(UNAVAILABLE)
    return errors


def document_responses(app: Litestar) -> None:
    for route in app.routes:
        if not route.path.startswith("/v1/"):
            continue
        for handler in getattr(route, "route_handlers", ()):
            if not isinstance(handler, HTTPRouteHandler):
                continue
            responses: dict[int, ResponseSpec] = dict(handler.responses or {})
            model = handler.opt.get("response_model")
            if model is not None:
                responses[handler.status_code] = ResponseSpec(
                    data_container=model,
                    description="Created (replayed for a repeated key)",
                    generate_examples=False,
                )
            for error in _errors(handler, route.path):
                responses.setdefault(error.status, error.spec())
            handler.responses = responses
            data = handler.parsed_fn_signature.parameters.get("data")
            optional_body = data is not None and data.has_default
            handler.operation_class = _WithOptionalBody if optional_body else _WithHeaders


def _header(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


class _WithHeaders(Operation):
    """An operation whose responses declare the headers they carry, which Litestar's
    ``ResponseSpec`` cannot say."""

    def to_schema(self) -> dict[str, Any]:
        schema = super().to_schema()
        idempotent = any(
            isinstance(p, dict) and p.get("name") == "Idempotency-Key"
            for p in schema.get("parameters", ())
        )
        for status, response in schema.get("responses", {}).items():
            headers = response.setdefault("headers", {})
            headers["X-Request-Id"] = _header("X-Request-Id")
            if status in _RETRY_AFTER_STATUSES:
                headers["Retry-After"] = _header("Retry-After")
            if idempotent and status.startswith("2"):
                headers["Idempotent-Replayed"] = _header("Idempotent-Replayed")
        return schema


class _WithOptionalBody(_WithHeaders):
    """An operation whose body may be left out (``data: T | None = None``), which
    Litestar documents as required: generated clients would force one."""

    def to_schema(self) -> dict[str, Any]:
        schema = super().to_schema()
        body = schema.get("requestBody")
        if isinstance(body, dict):
            body["required"] = False
        return schema


def example_body(summary: str, value: dict[str, Any]) -> BodyKwarg:
    """A JSON request body with an example in the OpenAPI document (``Annotated[T, ...]``)."""
    return BodyKwarg(
        media_type=RequestEncodingType.JSON, examples=[Example(summary=summary, value=value)]
    )
