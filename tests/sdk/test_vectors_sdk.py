"""The Python SDK agrees with the shared test vectors in sdk-spec/vectors/.

The same files drive the server's tests (tests/contract/test_vectors_server.py) and
any native SDK's, so this is where the reference SDK proves it behaves as the spec
says: retry decisions, push parsing, the upload part plan and local limit checks,
error classes, and webhook verification.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tellback_sdk import errors as sdk_errors
from tellback_sdk._retry import (
    DEFAULT_POLICY,
    is_retryable_status,
    may_repeat,
    parse_retry_after,
    should_retry,
)
from tellback_sdk._uploads import check_limits, plan_parts
from tellback_sdk.push import parse_push
from tellback_sdk.types import ClientConfig, MultipartPlan, PartUrl, SinglePlan

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "sdk-spec" / "vectors"


def load(family: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{family}.json").read_text(encoding="utf-8"))
    return data


def cases(family: str, key: str = "vectors") -> list[Any]:
    return [pytest.param(v, id=v["name"]) for v in load(family)[key]]


def _now(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# ----- retry decisions -----------------------------------------------------------------------


@pytest.mark.parametrize("vector", cases("retry_decisions"))
def test_retry_decision(vector: dict[str, Any]) -> None:
    inp, expected = vector["inputs"], vector["expected"]
    policy = DEFAULT_POLICY
    if inp["mode"] == "outbox":  # the outbox never runs out of retries
        policy = DEFAULT_POLICY.for_outbox().with_retries(sys.maxsize)
    key = "k" if inp["idempotency_key"] else None
    delay = None
    if may_repeat(inp["method"], key):
        delay = should_retry(
            inp["status"],
            inp["headers"],
            inp["attempt"],
            code=inp["code"],
            policy=policy,
            uniform=lambda _lo, _hi: float(inp["jitter"]),
            now=_now(inp["now"]),
        )
    assert (delay is not None) == expected["retry"]
    if expected["retry"]:
        assert delay == pytest.approx(expected["delay"])
        lo, hi = expected["delay_range"]
        assert lo - 1e-9 <= delay <= hi + 1e-9


# ----- push ----------------------------------------------------------------------------------


def _event(parsed: Any) -> dict[str, Any] | None:
    if parsed is None:
        return None
    fields = ("type", "conversation_id", "message_id", "badge", "title", "body")
    return {f: getattr(parsed, f) for f in fields}


@pytest.mark.parametrize("vector", cases("push_payloads", "payloads"))
def test_parse_push_of_server_payloads(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    event = expected["event"]
    assert _event(parse_push(expected["apns"]["payload"])) == event
    fcm = expected["fcm"]["message"]
    assert _event(parse_push(fcm)) == event  # a whole FCM message
    assert _event(parse_push(fcm["data"])) == {**event, "title": None, "body": None}


@pytest.mark.parametrize("vector", cases("push_payloads", "parsing"))
def test_parse_push(vector: dict[str, Any]) -> None:
    assert _event(parse_push(vector["inputs"]["payload"])) == vector["expected"]["event"]


# ----- uploads -------------------------------------------------------------------------------


def _config(kind: str, limits: dict[str, Any]) -> ClientConfig:
    everything = {"max_bytes": 1, "content_types": []}
    attachments = dict.fromkeys(("photo", "video", "file", "log"), everything) | {kind: limits}
    return msgspec.convert(
        {"app": {"id": "app", "name": "Vectors"}, "attachments": attachments}, ClientConfig
    )


# Vectors the SDK is known to disagree with (each a bug to fix): none today.
SDK_KNOWN_DISAGREEMENTS: dict[str, str] = {}


def _xfail_known(vector: dict[str, Any]) -> None:
    reason = SDK_KNOWN_DISAGREEMENTS.get(vector["name"])
    if reason is not None:
        pytest.xfail(reason)


@pytest.mark.parametrize("vector", cases("upload_plans"))
def test_upload_limits_and_plan(vector: dict[str, Any]) -> None:
    inp, expected = vector["inputs"], vector["expected"]
    size = inp["size"]
    if inp["limits"] is not None:
        config = _config(inp["kind"], inp["limits"])
        if expected["outcome"] == "refused":
            refusal = (
                sdk_errors.AttachmentTooLargeError
                if expected["status"] == 413
                else sdk_errors.AttachmentTypeNotAllowedError
            )
            with pytest.raises(refusal):
                check_limits(config, inp["kind"], size, inp["content_type"])
            return
        try:
            check_limits(config, inp["kind"], size, inp["content_type"])
        except sdk_errors.AttachmentLimitError:
            _xfail_known(vector)
            raise
    if expected["method"] == "single":
        parts = plan_parts(size, SinglePlan(url="https://put/1"), None)
    else:
        count = expected["part_count"]
        urls = [PartUrl(part_number=n, url=f"https://put/{n}") for n in range(1, count + 1)]
        plan = MultipartPlan(part_size=expected["part_size"], part_count=count, parts=urls)
        parts = plan_parts(size, None, plan)
        assert len(parts) == count
        assert parts[-1].length == expected["last_part_size"]
    assert sum(p.length for p in parts) == size
    ranges = [{"part_number": p.number, "offset": p.offset, "length": p.length} for p in parts]
    if "parts" in expected:
        assert ranges == expected["parts"]


# ----- error bodies --------------------------------------------------------------------------


def _response(vector: dict[str, Any]) -> httpx.Response:
    resp = vector["response"]
    body = resp["body"]
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return httpx.Response(
        resp["status"],
        headers=resp["headers"],
        content=content,
        request=httpx.Request("POST", "https://tellback.test/v1/client/conversations"),
    )


@pytest.mark.parametrize("vector", cases("error_bodies"))
def test_error_class(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    response = _response(vector)
    err = sdk_errors.make_status_error(response)
    assert type(err).__name__ == expected["python_error"]
    assert isinstance(err, getattr(sdk_errors, expected["python_error"]))
    assert err.status_code == expected["status"]
    assert err.code == expected["code"]
    assert err.request_id == expected["request_id"]
    assert err.detail == expected["detail"]
    if isinstance(err, sdk_errors.UnprocessableEntityError):
        assert [{"field": e.field, "message": e.message} for e in err.errors] == (
            expected["field_errors"]
        )
    now = _now(vector.get("now", "2027-01-15T08:00:00Z"))
    assert parse_retry_after(response.headers, now) == expected["retry_after_seconds"]
    if isinstance(err, sdk_errors.RateLimitError | sdk_errors.ServiceUnavailableError) and (
        expected["retry_after_seconds"] is not None and vector["source"] == "server"
    ):
        assert err.retry_after == expected["retry_after_seconds"]
    assert is_retryable_status(err.status_code, err.code) == expected["retryable"]


# ----- webhooks ------------------------------------------------------------------------------


def _reason(message: str) -> str:
    if "missing" in message:
        return "headers"
    if "timestamp" in message:
        return "timestamp"
    return "signature"


@pytest.mark.parametrize("vector", cases("webhook_signatures", "verification"))
def test_webhook_verify(vector: dict[str, Any]) -> None:
    webhooks = pytest.importorskip(
        "tellback_sdk.webhooks", reason="tellback_sdk.webhooks is not there yet"
    )
    pytest.importorskip("standardwebhooks", reason="the webhooks extra is not installed")
    inp, expected = vector["inputs"], vector["expected"]
    body = inp["body"].encode("utf-8")
    kwargs = {"tolerance": inp["tolerance_seconds"], "now": float(inp["now"])}
    if expected["valid"]:
        event = webhooks.verify(body, inp["headers"], inp["secrets"], **kwargs)
        assert event.id == json.loads(body)["id"]
        return
    with pytest.raises(webhooks.WebhookVerificationError) as info:
        webhooks.verify(body, inp["headers"], inp["secrets"], **kwargs)
    assert _reason(str(info.value)) == expected["reason"]


@pytest.mark.parametrize("vector", cases("webhook_signatures", "signing"))
def test_webhook_verify_accepts_what_the_server_signs(vector: dict[str, Any]) -> None:
    webhooks = pytest.importorskip("tellback_sdk.webhooks")
    pytest.importorskip("standardwebhooks")
    inp = vector["inputs"]
    headers = {
        "webhook-id": inp["msg_id"],
        "webhook-timestamp": str(inp["timestamp"]),
        "webhook-signature": vector["expected"]["webhook-signature"],
    }
    for secret in inp["secrets"]:
        webhooks.verify(inp["body"].encode(), headers, secret, now=float(inp["timestamp"]))
