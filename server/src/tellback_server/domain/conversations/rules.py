"""Validation of feedback against the app's settings (custom fields, categories, context)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from tellback_server.domain.apps.schemas import AppSettings, CustomFieldDefinition
from tellback_server.http.errors import FieldError, ValidationFailed

if TYPE_CHECKING:
    from tellback_server.domain.conversations.schemas import Location

MAX_CONTEXT_BYTES = 64 * 1024


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float)


def _check_string(d: CustomFieldDefinition, value: Any) -> str | None:
    if not isinstance(value, str):
        return "expected a string"
    limit = min(d.max_length or 10000, 10000)
    return f"at most {limit} characters" if len(value) > limit else None


def _check_choice(d: CustomFieldDefinition, value: Any) -> str | None:
    options = d.options or []
    if d.type == "select":
        return None if value in options else f"expected one of: {', '.join(options)}"
    if isinstance(value, list) and all(v in options for v in value):
        return None
    return f"expected a list drawn from: {', '.join(options)}"


_SIMPLE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "number": (_is_number, "expected a number"),
    "integer": (lambda v: not isinstance(v, bool) and isinstance(v, int), "expected an integer"),
    "boolean": (lambda v: isinstance(v, bool), "expected true or false"),
}


def _check_field(d: CustomFieldDefinition, value: Any) -> str | None:
    """Return a message when ``value`` does not fit definition ``d``."""
    if d.type == "string":
        return _check_string(d, value)
    if d.type in _SIMPLE_CHECKS:
        ok, message = _SIMPLE_CHECKS[d.type]
        return None if ok(value) else message
    return _check_choice(d, value)


def validate_custom_fields(settings: AppSettings, values: dict[str, Any]) -> dict[str, Any]:
    definitions = {d.key: d for d in settings.custom_fields}
    errors = [
        FieldError(field=f"custom_fields.{key}", message="not a field of this app")
        for key in values
        if key not in definitions
    ]
    for key, d in definitions.items():
        value = values.get(key)
        if value is None:
            if d.required:
                errors.append(FieldError(field=f"custom_fields.{key}", message="is required"))
            continue
        if (message := _check_field(d, value)) is not None:
            errors.append(FieldError(field=f"custom_fields.{key}", message=message))
    if errors:
        detail = "; ".join(f"custom field '{e.field.split('.', 1)[1]}' {e.message}" for e in errors)
        raise ValidationFailed(detail, errors=errors)
    return {k: v for k, v in values.items() if v is not None}


def validate_category(settings: AppSettings, category: str | None) -> None:
    if category is None or not settings.categories:
        return
    if category not in settings.categories:
        raise ValidationFailed.field(
            "category", f"must be one of: {', '.join(settings.categories)}"
        )


def validate_context(context: Any) -> msgspec.Raw | dict[str, Any]:
    """The context as its column stores it: its JSON, already encoded (the JSON column's
    bind passes a ``msgspec.Raw`` through as it is), once its size is checked."""
    if context is None:
        return {}
    raw = msgspec.json.encode(context)
    if len(raw) > MAX_CONTEXT_BYTES:
        raise ValidationFailed.field("context", f"at most {MAX_CONTEXT_BYTES} bytes of JSON")
    return msgspec.Raw(raw)


def clean_tags(tags: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for tag in tags:
        t = tag.strip()
        if not t:
            raise ValidationFailed.field("tags", "tags must not be blank")
        seen.setdefault(t, None)
    return list(seen)


def clean_body(body: str | None, *, required: bool) -> str | None:
    if body is None:
        if required:
            raise ValidationFailed.field("body", "is required")
        return None
    if not body.strip():
        raise ValidationFailed.field("body", "must not be blank")
    return body


def clean_location(location: Location | None) -> dict[str, Any] | None:
    """The location as its column stores it, ``captured_at`` in UTC (a time without an
    offset is taken as UTC, as RFC 3339's ``Z``). A time that has no UTC equivalent
    (``0001-01-01T00:00:00+01:00``) is refused: every reader would fail on it."""
    if location is None:
        return None
    stored: dict[str, Any] = msgspec.to_builtins(location)
    at = location.captured_at
    if at is not None:
        try:
            utc = at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)
        except OverflowError:
            raise ValidationFailed.field(
                "location.captured_at", "is outside the years 1 to 9999 in UTC"
            ) from None
        stored["captured_at"] = msgspec.to_builtins(utc)
    return stored
