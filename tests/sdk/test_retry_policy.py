"""The retry decision as a pure function (sdk-spec/retries-and-idempotency.md)."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

from tellback_sdk import (
    ConversationClosedError,
    IdempotencyKeyInProgressError,
    IdempotencyKeyReusedError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
    UnprocessableEntityError,
    backoff_delay,
    parse_retry_after,
    should_retry,
)
from tellback_sdk._retry import may_repeat
from tellback_sdk.errors import APIStatusError, make_status_error

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def mid(_a: float, _b: float) -> float:
    return 1.0


@pytest.mark.parametrize(
    ("status", "code", "retried"),
    [
        (None, None, True),
        (408, None, True),
        (409, "idempotency_key_in_progress", True),
        (409, "idempotency_key_reused", False),
        (409, "conversation_closed", False),
        (429, "rate_limited", True),
        (500, "internal_error", True),
        (502, None, True),
        (503, "storage_unavailable", True),
        (504, None, True),
        (400, "bad_request", False),
        (401, "unauthenticated", False),
        (403, None, False),
        (404, None, False),
        (413, None, False),
        (415, None, False),
        (422, "validation_failed", False),
        (501, None, False),
    ],
)
def test_which_statuses_retry(status: int | None, code: str | None, retried: bool) -> None:
    assert (should_retry(status, {}, 1, code=code, uniform=mid) is not None) is retried


def test_backoff_doubles_from_half_a_second_up_to_the_cap() -> None:
    delays = [should_retry(503, {}, n, uniform=mid) for n in range(1, 5)]
    assert delays == [0.5, 1.0, 2.0, 4.0]
    policy = RetryPolicy(max_retries=10)
    assert backoff_delay(10, policy, mid) == 30.0
    assert should_retry(503, {}, 5) is None  # four retries, then give up


def test_jitter_stays_within_a_quarter() -> None:
    for _ in range(200):
        delay = backoff_delay(3)
        assert 1.5 <= delay <= 2.5


def test_retry_after_seconds_and_http_date_win_over_backoff() -> None:
    assert should_retry(429, {"Retry-After": "7"}, 1, uniform=mid) == 7.0
    date = "Wed, 01 Jan 2025 12:00:30 GMT"
    assert should_retry(503, {"retry-after": date}, 1, now=NOW) == 30.0
    assert parse_retry_after({"Retry-After": "Wed, 01 Jan 2025 11:00:00 GMT"}, NOW) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}) is None


def test_interactive_calls_cap_retry_after_the_outbox_does_not() -> None:
    assert should_retry(429, {"Retry-After": "600"}, 1) == 60.0
    outbox = RetryPolicy().for_outbox()
    assert should_retry(429, {"Retry-After": "600"}, 1, policy=outbox) == 600.0


def test_only_repeatable_requests_retry() -> None:
    assert may_repeat("GET", None)
    assert may_repeat("PUT", None)
    assert may_repeat("DELETE", None)
    assert may_repeat("POST", "key")
    assert not may_repeat("POST", None)
    assert not may_repeat("PATCH", None)
    assert may_repeat("POST", None, safe=True)


def problem(status: int, code: str | None = None, **extra: object) -> httpx.Response:
    body: dict[str, object] = {"type": "about:blank", "title": "t", "status": status, **extra}
    if code:
        body["code"] = code
    request = httpx.Request("GET", "http://x/v1/client/me")
    return httpx.Response(
        status, json=body, headers={"X-Request-Id": "rid-1", "Retry-After": "3"}, request=request
    )


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (404, "not_found", NotFoundError),
        (409, "idempotency_key_reused", IdempotencyKeyReusedError),
        (409, "idempotency_key_in_progress", IdempotencyKeyInProgressError),
        (409, "conversation_closed", ConversationClosedError),
        (429, "rate_limited", RateLimitError),
        (503, "storage_unavailable", ServiceUnavailableError),
        (500, "internal_error", InternalServerError),
        (507, None, InternalServerError),
        (404, "idempotency_key_reused", NotFoundError),  # a code never overrides its status
        (418, "teapot", APIStatusError),
    ],
)
def test_error_class_by_status_then_code(
    status: int, code: str | None, cls: type[APIStatusError]
) -> None:
    err = make_status_error(problem(status, code))
    assert type(err) is cls
    assert err.status_code == status
    assert err.code == code
    assert err.request_id == "rid-1"


def test_validation_errors_and_retry_after_are_exposed() -> None:
    err = make_status_error(
        problem(422, "validation_failed", errors=[{"field": "body", "message": "too long"}])
    )
    assert isinstance(err, UnprocessableEntityError)
    assert [(e.field, e.message) for e in err.errors] == [("body", "too long")]
    limited = make_status_error(problem(429, "rate_limited"))
    assert isinstance(limited, RateLimitError)
    assert limited.retry_after == 3.0


def test_non_json_error_bodies_still_map() -> None:
    request = httpx.Request("PUT", "http://s3/bucket/key")
    err = make_status_error(
        httpx.Response(403, text="<Error>AccessDenied</Error>", request=request)
    )
    assert err.status_code == 403
    assert err.code is None
