"""Generate the shared test vectors in this folder from the server's own code.

    uv run python sdk-spec/vectors/generate.py           # rewrite the *.json files
    uv run python sdk-spec/vectors/generate.py --check   # exit 1 if a file is stale

Where the server is the source of truth (identity token checks, webhook
signatures, push payloads, problem+json bodies, the upload plan and the default
attachment limits) the expected outcome is computed by calling the server's
functions, so the vectors cannot drift from it: tests/contract/test_vectors_server.py
fails when a committed file differs from what this script produces. Where the
spec is the source of truth and no server code exists (the SDK retry policy,
what a receiver does with a push or a webhook, a pagination walk) the expected
outcome is computed here, from the formulas in sdk-spec/*.md, independently of the
Python SDK, which tests/sdk/test_vectors_sdk.py then checks against them.

Everything is deterministic: fixed secrets, ids and clocks.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

HERE = Path(__file__).resolve().parent
FAMILIES = (
    "identity_tokens",
    "webhook_signatures",
    "push_payloads",
    "error_bodies",
    "retry_decisions",
    "pagination_walks",
    "upload_plans",
)

# A fixed "now" for everything time-dependent: 2027-01-15T08:00:00Z.
NOW = 1_800_000_000
NOW_ISO = "2027-01-15T08:00:00Z"
MIB = 1024 * 1024


def _doc(family: str, description: str, **lists: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "$schema": f"./schema/{family}.schema.json",
        "description": description,
        "generated_by": "sdk-spec/vectors/generate.py",
        **lists,
    }


# ----- identity tokens ------------------------------------------------------------------------

IDENTITY_SECRETS = [
    {"kid": "k_old001", "secret": "tbi_vectors-older-secret-0123456789abcdefABCDEF"},
    {"kid": "k_new002", "secret": "tbi_vectors-newer-secret-fedcba9876543210FEDCBA"},
]


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def make_jwt(
    header: dict[str, Any],
    claims: dict[str, Any],
    secret: str | None,
    *,
    signature: str | None = None,
) -> str:
    """A compact JWT built byte by byte (no library: its JSON layout must never change)."""
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    if signature is None:
        assert secret is not None
        digest = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
        signature = _b64url(digest)
    return f"{signing_input}.{signature}"


@contextmanager
def jwt_clock(now: float) -> Iterator[None]:
    """Make PyJWT (which the server uses) see ``now`` as the current time."""
    import jwt.api_jwt as api  # noqa: PLC0415

    real = api.datetime  # type: ignore[attr-defined]

    class Frozen(real):  # type: ignore[misc,valid-type]
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Any:
            return real.fromtimestamp(now, tz)

    api.datetime = Frozen  # type: ignore[attr-defined]
    try:
        yield
    finally:
        api.datetime = real  # type: ignore[attr-defined]


def verify_token_with_server(token: str, secrets: list[dict[str, str]], now: int) -> dict[str, Any]:
    """The server's verdict on ``token`` (secrets oldest first, as the server keeps them)."""
    from tellback_server.domain.identity.tokens import (  # noqa: PLC0415
        InvalidIdentityToken,
        verify_identity_token,
    )

    by_kid = {s["kid"]: s["secret"].encode() for s in secrets}
    with jwt_clock(now):
        try:
            claims = verify_identity_token(token, by_kid)
        except InvalidIdentityToken as exc:
            return {"valid": False, "status": 401, "code": "unauthenticated", "reason": exc.reason}
    return {
        "valid": True,
        "sub": claims.sub,
        "name": claims.name,
        "email": claims.email,
        "kid": claims.kid,
    }


def identity_tokens() -> dict[str, Any]:
    old, new = IDENTITY_SECRETS
    hs = {"alg": "HS256", "typ": "JWT"}

    def h(kid: str | None = None, **extra: Any) -> dict[str, Any]:
        return {**hs, **({"kid": kid} if kid else {}), **extra}

    exp = NOW + 3600
    cases: list[tuple[str, str, list[dict[str, str]]]] = [
        (
            "valid: kid names the newest secret",
            make_jwt(h(new["kid"]), {"sub": "user-42", "exp": exp}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "valid: kid names an older, still active secret (rotation)",
            make_jwt(h(old["kid"]), {"sub": "user-42", "exp": exp}, old["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "valid: no kid, signed with the newest secret",
            make_jwt(h(), {"sub": "user-42", "exp": exp}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "valid: name, email and iat claims are read",
            make_jwt(
                h(new["kid"]),
                {
                    "sub": "user-42",
                    "exp": exp,
                    "iat": NOW - 10,
                    "name": "Ada Lovelace",
                    "email": "ada@example.com",
                },
                new["secret"],
            ),
            IDENTITY_SECRETS,
        ),
        (
            "valid: unicode sub of 255 characters",
            make_jwt(h(new["kid"]), {"sub": "ü" * 255, "exp": exp}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "valid: expired 30 s ago, inside the 60 s clock skew",
            make_jwt(h(new["kid"]), {"sub": "user-42", "exp": NOW - 30}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "valid: a name over 200 characters is cut to 200",
            make_jwt(h(new["kid"]), {"sub": "u", "exp": exp, "name": "N" * 250}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: expired 61 s ago, beyond the clock skew",
            make_jwt(h(new["kid"]), {"sub": "user-42", "exp": NOW - 61}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: signed with another secret",
            make_jwt(h(new["kid"]), {"sub": "user-42", "exp": exp}, "tbi_someone-elses-secret"),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: payload changed after signing",
            _tampered(make_jwt(h(new["kid"]), {"sub": "user-42", "exp": exp}, new["secret"])),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: no kid, signed with an older secret (only the newest is tried)",
            make_jwt(h(), {"sub": "user-42", "exp": exp}, old["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: kid of a revoked secret",
            make_jwt(h(old["kid"]), {"sub": "user-42", "exp": exp}, old["secret"]),
            [new],
        ),
        (
            "invalid: unknown kid",
            make_jwt(h("k_nope99"), {"sub": "user-42", "exp": exp}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: alg none",
            make_jwt(
                {"alg": "none", "typ": "JWT"}, {"sub": "user-42", "exp": exp}, None, signature=""
            ),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: alg HS512",
            _hs512(h(new["kid"], alg="HS512"), {"sub": "user-42", "exp": exp}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: alg RS256 (never use the secret as a public key)",
            make_jwt(
                h(new["kid"], alg="RS256"),
                {"sub": "user-42", "exp": exp},
                None,
                signature=_b64url(b"\x00" * 256),
            ),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: missing sub",
            make_jwt(h(new["kid"]), {"exp": exp}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: missing exp",
            make_jwt(h(new["kid"]), {"sub": "user-42"}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: empty sub",
            make_jwt(h(new["kid"]), {"sub": "", "exp": exp}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: sub longer than 255 characters",
            make_jwt(h(new["kid"]), {"sub": "x" * 256, "exp": exp}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        (
            "invalid: sub is a number",
            make_jwt(h(new["kid"]), {"sub": 42, "exp": exp}, new["secret"]),
            IDENTITY_SECRETS,
        ),
        ("invalid: not a JWT", "not-a-jwt", IDENTITY_SECRETS),
    ]
    vectors = [
        {
            "name": name,
            "inputs": {"token": token, "secrets": secrets, "now": NOW},
            "expected": verify_token_with_server(token, secrets, NOW),
        }
        for name, token, secrets in cases
    ]
    return _doc(
        "identity_tokens",
        "End-user identity tokens (HS256 JWTs signed by the app's backend) and the server's "
        "verdict at inputs.now. secrets are the app's active identity secrets, oldest first; "
        "the HMAC key is the UTF-8 bytes of the secret string.",
        vectors=vectors,
    )


def _tampered(token: str) -> str:
    header, _, sig = token.split(".")
    claims = _b64url(
        json.dumps({"sub": "admin", "exp": NOW + 3600}, separators=(",", ":")).encode()
    )
    return f"{header}.{claims}.{sig}"


def _hs512(header: dict[str, Any], claims: dict[str, Any], secret: str) -> str:
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    digest = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha512).digest()
    return f"{signing_input}.{_b64url(digest)}"


# ----- webhook signatures ---------------------------------------------------------------------

WEBHOOK_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
WEBHOOK_SECRET_OLD = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()
WEBHOOK_BODY = (
    '{"id":"4711","type":"message.created","timestamp":"2027-01-15T07:59:59.123456Z",'
    '"data":{"conversation":{"id":"0194d3a0-0000-7000-8000-000000000001","status":"open"},'
    '"message":{"id":"0194d3a0-0000-7000-8000-000000000002","body":"Grüße aus Köln 👋",'
    '"internal":false}}}'
)


def _sign(secrets: list[str], msg_id: str, timestamp: int, body: str) -> str:
    from tellback_server.domain.webhooks.signing import signature_header  # noqa: PLC0415

    return signature_header(secrets, msg_id, timestamp, body.encode())


def webhook_signatures() -> dict[str, Any]:
    signing_cases = [
        ("one secret", [WEBHOOK_SECRET], "4711", NOW, WEBHOOK_BODY),
        (
            "rotation: new and old secret sign",
            [WEBHOOK_SECRET, WEBHOOK_SECRET_OLD],
            "4711",
            NOW,
            WEBHOOK_BODY,
        ),
        ("empty object body", [WEBHOOK_SECRET], "1", NOW, "{}"),
        ("old secret alone", [WEBHOOK_SECRET_OLD], "99", NOW - 5, WEBHOOK_BODY),
    ]
    signing = [
        {
            "name": name,
            "inputs": {"secrets": secrets, "msg_id": msg_id, "timestamp": ts, "body": body},
            "expected": {"webhook-signature": _sign(secrets, msg_id, ts, body)},
        }
        for name, secrets, msg_id, ts, body in signing_cases
    ]
    good = _sign([WEBHOOK_SECRET], "4711", NOW, WEBHOOK_BODY)
    both = _sign([WEBHOOK_SECRET, WEBHOOK_SECRET_OLD], "4711", NOW, WEBHOOK_BODY)

    def headers(sig: str, msg_id: str = "4711", ts: str = str(NOW)) -> dict[str, str]:
        return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": sig}

    def ok(name: str, hdrs: dict[str, str], secrets: list[str], now: int = NOW) -> dict[str, Any]:
        return _verification(name, hdrs, WEBHOOK_BODY, secrets, now, True, None)

    def bad(
        name: str,
        hdrs: dict[str, str],
        secrets: list[str],
        reason: str,
        now: int = NOW,
        body: str = WEBHOOK_BODY,
    ) -> dict[str, Any]:
        return _verification(name, hdrs, body, secrets, now, False, reason)

    old_only = _sign([WEBHOOK_SECRET_OLD], "4711", NOW, WEBHOOK_BODY)
    verification = [
        ok("valid", headers(good), [WEBHOOK_SECRET]),
        ok("rotation: receiver has the new secret", headers(both), [WEBHOOK_SECRET]),
        ok("rotation: receiver has the old secret", headers(both), [WEBHOOK_SECRET_OLD]),
        ok(
            "receiver configured with two secrets",
            headers(old_only),
            [WEBHOOK_SECRET, WEBHOOK_SECRET_OLD],
        ),
        ok("timestamp 300 s old: at the tolerance", headers(good), [WEBHOOK_SECRET], NOW + 300),
        ok("timestamp 300 s ahead: at the tolerance", headers(good), [WEBHOOK_SECRET], NOW - 300),
        ok("unknown signature versions are ignored", headers("v2,abc " + good), [WEBHOOK_SECRET]),
        bad("wrong secret", headers(good), [WEBHOOK_SECRET_OLD], "signature"),
        bad(
            "body changed by one byte",
            headers(good),
            [WEBHOOK_SECRET],
            "signature",
            body=WEBHOOK_BODY.replace("open", "opeN"),
        ),
        bad("webhook-id changed", headers(good, msg_id="4712"), [WEBHOOK_SECRET], "signature"),
        bad("timestamp changed", headers(good, ts=str(NOW + 1)), [WEBHOOK_SECRET], "signature"),
        bad("timestamp 301 s old", headers(good), [WEBHOOK_SECRET], "timestamp", NOW + 301),
        bad(
            "timestamp 301 s in the future", headers(good), [WEBHOOK_SECRET], "timestamp", NOW - 301
        ),
        bad("timestamp not a number", headers(good, ts="yesterday"), [WEBHOOK_SECRET], "timestamp"),
        bad(
            "only a v2 signature",
            headers("v2," + good.partition(",")[2]),
            [WEBHOOK_SECRET],
            "signature",
        ),
        bad("signature not base64", headers("v1,!!!not-base64!!!"), [WEBHOOK_SECRET], "signature"),
        bad(
            "missing webhook-signature",
            {"webhook-id": "4711", "webhook-timestamp": str(NOW)},
            [WEBHOOK_SECRET],
            "headers",
        ),
        bad(
            "missing webhook-id",
            {"webhook-timestamp": str(NOW), "webhook-signature": good},
            [WEBHOOK_SECRET],
            "headers",
        ),
    ]
    return _doc(
        "webhook_signatures",
        "Standard Webhooks signatures. signing: what the server sends for the given secrets, "
        "id, timestamp and raw body (UTF-8). verification: what a receiver must decide at "
        "inputs.now with a 300 s tolerance.",
        signing=signing,
        verification=verification,
    )


def _verification(
    name: str,
    headers: dict[str, str],
    body: str,
    secrets: list[str],
    now: int,
    valid: bool,
    reason: str | None,
) -> dict[str, Any]:
    expected: dict[str, Any] = {"valid": valid}
    if reason is not None:
        expected["reason"] = reason
    return {
        "name": name,
        "inputs": {
            "headers": headers,
            "body": body,
            "secrets": secrets,
            "now": now,
            "tolerance_seconds": 300,
        },
        "expected": expected,
    }


# ----- push payloads --------------------------------------------------------------------------

CONV_ID = "0194d3a0-0000-7000-8000-00000000c0c0"
MSG_ID = "0194d3a0-0000-7000-8000-00000000beef"
PUSH_TOKEN = "fcm-registration-token-0123456789"  # noqa: S105 (a fake device token)


def _server_notification(inp: dict[str, Any]) -> Any:
    """The server's own Notification for these facts (domain/push/delivery.py)."""
    from tellback_server.domain.push.delivery import _Facts, _notification  # noqa: PLC0415
    from tellback_server.domain.push.payloads import snippet  # noqa: PLC0415

    has_image = inp["has_image"]
    # delivery._facts: the text when the message has none.
    text = snippet(inp["message_body"]) or ("Sent a photo" if has_image else "Sent an attachment")
    facts = _Facts(
        message=cast(Any, SimpleNamespace(id=inp["message_id"])),
        conv=cast(
            Any,
            SimpleNamespace(id=inp["conversation_id"], message_count=inp["conversation_messages"]),
        ),
        app=cast(Any, SimpleNamespace(name=inp["app_name"])),
        content_free=inp["content_free"],
        has_image=has_image,
        text=text,
        agent_name=inp["agent_name"],
        user_name=inp["user_name"],
        user_unread=inp["badge"],
    )
    return _notification(facts, inp["audience"], inp["badge"], None)


def push_payloads() -> dict[str, Any]:
    from tellback_server.domain.push.payloads import apns_payload, fcm_message  # noqa: PLC0415

    base = {
        "audience": "user",
        "app_name": "Acme",
        "content_free": False,
        "message_body": "Thanks! Fixed in 2.3.2.",
        "has_image": False,
        "agent_name": "Ada",
        "user_name": "Grace",
        "conversation_messages": 2,
        "badge": 1,
        "conversation_id": CONV_ID,
        "message_id": MSG_ID,
        "push_token": PUSH_TOKEN,
    }
    long_text = "Line one\n\n  line two\twith tabs " + "word " * 60
    cases: list[tuple[str, dict[str, Any]]] = [
        ("agent reply to the end user", {}),
        ("agent reply with a photo: mutable-content", {"has_image": True}),
        ("photo without text", {"has_image": True, "message_body": None}),
        ("attachment without text", {"message_body": ""}),
        (
            "long multi-line text: one line, cut at 178 characters",
            {"message_body": long_text, "badge": 12},
        ),
        ("text of exactly 178 characters is not cut", {"message_body": "a" * 178}),
        (
            "the cut falls before a flag it would split (grapheme clusters stay whole)",
            {"message_body": "a" * 176 + "\U0001f1e9\U0001f1ea and more"},
        ),
        (
            "the cut falls before a family emoji it would split",
            {"message_body": "a" * 175 + "\U0001f468\u200d\U0001f469\u200d\U0001f467 more"},
        ),
        ("agent without a name: title is the app name", {"agent_name": None}),
        ("content-free mode (end user)", {"content_free": True, "badge": 3}),
        (
            "new feedback, to an agent",
            {
                "audience": "agent",
                "conversation_messages": 1,
                "message_body": "The app crashes when I rotate",
            },
        ),
        (
            "user reply, to an agent",
            {"audience": "agent", "conversation_messages": 4, "badge": 2},
        ),
        (
            "user reply from an anonymous user, to an agent",
            {"audience": "agent", "user_name": None},
        ),
        (
            "new feedback, content-free, to an agent",
            {"audience": "agent", "conversation_messages": 1, "content_free": True},
        ),
        ("user reply, content-free, to an agent", {"audience": "agent", "content_free": True}),
        ("badge zero", {"badge": 0}),
    ]
    vectors = []
    for name, changes in cases:
        inp = {**base, **changes}
        n = _server_notification(inp)
        vectors.append(
            {
                "name": name,
                "inputs": inp,
                "expected": {
                    "apns": {
                        "headers": {
                            "apns-push-type": "alert",
                            "apns-collapse-id": n.message_id,
                            "apns-priority": "10",
                        },
                        "payload": apns_payload(n),
                    },
                    "fcm": {"message": fcm_message(inp["push_token"], n)},
                    "event": {
                        "type": n.type,
                        "conversation_id": n.conversation_id,
                        "message_id": n.message_id,
                        "badge": n.badge,
                        "title": n.title,
                        "body": n.body,
                    },
                },
            }
        )
    return _doc(
        "push_payloads",
        "payloads: what the server sends to APNs and FCM for a message (inputs are the facts "
        "the server knows), and the event an SDK parses from it (from the APNs payload; from "
        "FCM data, which has no title/body, the same type, ids and badge). parsing: pushes an "
        "SDK receives and what it must make of them (null: not Tellback's, leave it to the app).",
        payloads=vectors,
        parsing=_push_parsing(),
    )


def _push_parsing() -> list[dict[str, Any]]:
    def event(
        type_: str = "message.created",
        message_id: str | None = MSG_ID,
        badge: int | None = 1,
        title: str | None = None,
        body: str | None = None,
    ) -> dict[str, Any]:
        return {
            "type": type_,
            "conversation_id": CONV_ID,
            "message_id": message_id,
            "badge": badge,
            "title": title,
            "body": body,
        }

    keys = {"type": "message.created", "conversation_id": CONV_ID, "message_id": MSG_ID}
    cases: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
        ("FCM data only (what an Android app receives)", {**keys, "badge": "1"}, event()),
        (
            "whole FCM message",
            {"notification": {"title": "Ada", "body": "Hi"}, "data": {**keys, "badge": "7"}},
            event(badge=7, title="Ada", body="Hi"),
        ),
        (
            "APNs userInfo with a string alert",
            {"aps": {"alert": "Hi", "badge": 2}, "tellback": keys},
            event(badge=2, body="Hi"),
        ),
        ("APNs without badge", {"aps": {}, "tellback": keys}, event(badge=None)),
        (
            "unknown type is kept as opaque text",
            {**keys, "type": "conversation.assigned", "badge": "0"},
            event(type_="conversation.assigned", badge=0),
        ),
        (
            "FCM data without message_id",
            {"type": "conversation.updated", "conversation_id": CONV_ID},
            event(type_="conversation.updated", message_id=None, badge=None),
        ),
        ("FCM badge not a number", {**keys, "badge": "many"}, event(badge=None)),
        ("another SDK's push", {"aps": {"alert": "Sale!"}, "campaign": "x"}, None),
        ("FCM data without conversation_id", {"type": "message.created", "badge": "1"}, None),
        ("empty payload", {}, None),
    ]
    return [
        {"name": name, "inputs": {"payload": payload}, "expected": {"event": ev}}
        for name, payload, ev in cases
    ]


# ----- error bodies ---------------------------------------------------------------------------

REQUEST_ID = "0194d3a0c0de7000800000000000abcd"
PYTHON_ERROR_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "PayloadTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}
PYTHON_ERROR_BY_CODE = {
    "idempotency_key_reused": "IdempotencyKeyReusedError",
    "idempotency_key_in_progress": "IdempotencyKeyInProgressError",
    "upload_incomplete": "UploadIncompleteError",
    "conversation_closed": "ConversationClosedError",
}


def _python_error(status: int, code: str | None) -> str:
    """The Python SDK's class, from errors.md: by code within its status, else by status."""
    if code in PYTHON_ERROR_BY_CODE and status == 409:
        return PYTHON_ERROR_BY_CODE[code]
    if status in PYTHON_ERROR_BY_STATUS:
        return PYTHON_ERROR_BY_STATUS[status]
    return "InternalServerError" if status >= 500 else "APIStatusError"


def _render(handler: Any, exc: BaseException) -> tuple[int, dict[str, str], bytes]:
    request = SimpleNamespace(scope={"state": {"request_id": REQUEST_ID}})
    response = handler(request, exc)
    headers = {"Content-Type": response.media_type, **(response.headers or {})}
    headers["X-Request-Id"] = REQUEST_ID  # added to every response by the middleware
    return response.status_code, headers, response.content


def server_error_cases() -> list[tuple[str, Any, BaseException]]:
    """(name, handler, exception) for every error the server renders (domain code included)."""
    import litestar.exceptions as lx  # noqa: PLC0415

    from tellback_server.domain.attachments.services import UploadIncomplete  # noqa: PLC0415
    from tellback_server.domain.conversations.services import ConversationClosed  # noqa: PLC0415
    from tellback_server.http import errors as e  # noqa: PLC0415
    from tellback_server.storage.base import StorageError  # noqa: PLC0415

    app = e._app_error
    return [
        (
            "400 bad_request (bad cursor)",
            app,
            e.BadRequest("cursor is not valid; pass the next_cursor of a previous page"),
        ),
        (
            "401 unauthenticated (expired identity token)",
            app,
            e.Unauthenticated("user_token has expired"),
        ),
        ("403 forbidden", app, e.Forbidden("this agent is not a member of the app")),
        ("404 not_found", app, e.NotFound("no such conversation")),
        ("405 method_not_allowed", e._http_exception, lx.MethodNotAllowedException()),
        (
            "409 idempotency_key_reused",
            app,
            e.IdempotencyKeyReused("this Idempotency-Key was used with a different request body"),
        ),
        (
            "409 idempotency_key_in_progress (Retry-After)",
            app,
            e.IdempotencyKeyInProgress(
                "a request with this Idempotency-Key is still being processed"
            ),
        ),
        ("409 conversation_closed", app, ConversationClosed("the conversation is closed")),
        ("409 upload_incomplete", app, UploadIncomplete("part 2 is missing")),
        (
            "413 payload_too_large",
            app,
            e.PayloadTooLarge("a photo may be at most 20971520 bytes; this one is 30000000"),
        ),
        (
            "415 unsupported_media_type",
            app,
            e.UnsupportedMediaType("image/bmp is not allowed for photos"),
        ),
        (
            "422 validation_failed with field errors",
            app,
            e.ValidationFailed.field("custom_fields.order_id", "expected a string"),
        ),
        (
            "422 validation_failed with several fields",
            app,
            e.ValidationFailed(
                "body: too long; tags[0]: too long",
                errors=[e.FieldError("body", "too long"), e.FieldError("tags[0]", "too long")],
            ),
        ),
        (
            "429 rate_limited (Retry-After)",
            app,
            e.RateLimited("too many requests for this user", retry_after=12),
        ),
        (
            "500 internal_error (no exception text leaks)",
            e._unexpected,
            RuntimeError("secret SQL here"),
        ),
        (
            "503 service_unavailable (Retry-After)",
            app,
            e.ServiceUnavailable("the database is unavailable; retry shortly"),
        ),
        (
            "503 storage_unavailable (Retry-After)",
            e._storage,
            StorageError("minio: connection refused"),
        ),
    ]


def _spec_retryable(status: int | None, code: str | None) -> bool:
    if status is None:
        return True
    if status == 409:
        return code == "idempotency_key_in_progress"
    return status in {408, 429, 500, 502, 503, 504}


def _error_expected(status: int, headers: dict[str, str], body: Any) -> dict[str, Any]:
    problem = body if isinstance(body, dict) else {}
    code = problem.get("code") if isinstance(problem.get("code"), str) else None
    retry_after = _retry_after_seconds(headers, dt.datetime.fromtimestamp(NOW, dt.UTC))
    return {
        "status": status,
        "code": code,
        "request_id": headers.get("X-Request-Id") or problem.get("request_id"),
        "detail": problem.get("detail"),
        "field_errors": problem.get("errors") or [],
        "retry_after_seconds": retry_after,
        "retryable": _spec_retryable(status, code),
        "python_error": _python_error(status, code),
    }


def error_bodies() -> dict[str, Any]:
    import structlog  # noqa: PLC0415

    vectors = []
    before = structlog.get_config()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # quiet handlers' logs
    try:
        for name, handler, exc in server_error_cases():
            status, headers, content = _render(handler, exc)
            body = json.loads(content)
            vectors.append(
                {
                    "name": name,
                    "source": "server",
                    "response": {"status": status, "headers": headers, "body": body},
                    "expected": _error_expected(status, headers, body),
                }
            )
    finally:
        structlog.configure(**before)  # as it was, not structlog's defaults
    # Answers an SDK must handle that the server does not produce today.
    foreign: list[tuple[str, int, dict[str, str], Any]] = [
        (
            "unknown code on a known status maps by status (409)",
            409,
            {"Content-Type": "application/problem+json"},
            {"type": "about:blank", "title": "Conflict", "status": 409, "code": "brand_new_code"},
        ),
        (
            "unknown code on an unknown 4xx status",
            418,
            {"Content-Type": "application/problem+json"},
            {"type": "about:blank", "title": "I'm a Teapot", "status": 418, "code": "teapot"},
        ),
        (
            "502 from a proxy, not JSON",
            502,
            {"Content-Type": "text/html"},
            "<html><body>Bad Gateway</body></html>",
        ),
        (
            "503 from a proxy with an HTTP-date Retry-After",
            503,
            {"Content-Type": "text/plain", "Retry-After": "Fri, 15 Jan 2027 08:00:30 GMT"},
            "Service Unavailable",
        ),
        (
            "403 from storage on an expired presigned URL (XML)",
            403,
            {"Content-Type": "application/xml"},
            '<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>',
        ),
        (
            "409 idempotency_key_reused under an unexpected status stays by status",
            400,
            {"Content-Type": "application/problem+json"},
            {
                "type": "about:blank",
                "title": "Bad Request",
                "status": 400,
                "code": "idempotency_key_reused",
            },
        ),
    ]
    for name, status, headers, body in foreign:
        expected = _error_expected(status, headers, body)
        vectors.append(
            {
                "name": name,
                "source": "spec",
                "response": {"status": status, "headers": headers, "body": body},
                "now": NOW_ISO,
                "expected": expected,
            }
        )
    return _doc(
        "error_bodies",
        "Error responses and what an SDK reads from them. source=server: rendered by the "
        "server's own error handlers (X-Request-Id is added by its middleware). source=spec: "
        "answers from proxies, storage or future servers that an SDK must still handle. "
        "body is JSON, or a string when the response is not JSON. python_error names the "
        "Python SDK's class; native SDKs map it to their own error type.",
        vectors=vectors,
    )


# ----- retry decisions ------------------------------------------------------------------------

BASE_DELAY, CAP, MAX_RETRIES, INTERACTIVE_RETRY_AFTER_CAP = 0.5, 30.0, 4, 60.0
SAFE = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}


RETRY_AFTER_MAX = 86400.0  # a day


def _retry_after_seconds(headers: dict[str, str], now: dt.datetime) -> float | None:
    raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if raw is None:
        return None
    raw = raw.strip()
    if raw and all(part.isdigit() and part.isascii() for part in raw.split(".", 1)):
        return min(float(raw), RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, (when - now).total_seconds()), RETRY_AFTER_MAX)


def spec_retry(inp: dict[str, Any]) -> dict[str, Any]:
    """sdk-spec/retries-and-idempotency.md, written out independently of any SDK."""
    now = dt.datetime.fromisoformat(inp["now"].replace("Z", "+00:00"))
    status, attempt, mode = inp["status"], inp["attempt"], inp["mode"]
    repeatable = inp["method"] in SAFE or inp["idempotency_key"]
    no = {"retry": False, "delay": None, "delay_range": None}
    if not repeatable or not _spec_retryable(status, inp["code"]):
        return no
    if mode == "interactive" and attempt > MAX_RETRIES:
        return no
    retry_after = _retry_after_seconds(inp["headers"], now) if status is not None else None
    if retry_after is not None:
        if mode == "interactive":
            retry_after = min(retry_after, INTERACTIVE_RETRY_AFTER_CAP)
        return {"retry": True, "delay": retry_after, "delay_range": [retry_after, retry_after]}
    backoff = min(CAP, BASE_DELAY * 2 ** (attempt - 1))
    return {
        "retry": True,
        "delay": backoff * inp["jitter"],
        "delay_range": [backoff * 0.75, backoff * 1.25],
    }


def retry_decisions() -> dict[str, Any]:
    base: dict[str, Any] = {
        "method": "POST",
        "idempotency_key": True,
        "status": 503,
        "code": None,
        "headers": {},
        "attempt": 1,
        "jitter": 1.0,
        "now": NOW_ISO,
        "mode": "interactive",
    }
    date_30s = "Fri, 15 Jan 2027 08:00:30 GMT"
    cases: list[tuple[str, dict[str, Any]]] = [
        ("no response (connection refused), first retry", {"status": None}),
        ("no response, jitter at its low end", {"status": None, "jitter": 0.75}),
        ("no response, jitter at its high end", {"status": None, "jitter": 1.25}),
        ("503 without Retry-After, attempt 2", {"attempt": 2}),
        ("500, attempt 3", {"status": 500, "attempt": 3, "jitter": 0.9}),
        ("502, attempt 4 (the last interactive retry)", {"status": 502, "attempt": 4}),
        ("504, attempt 5: interactive budget spent", {"status": 504, "attempt": 5}),
        ("408 request timeout", {"status": 408}),
        ("429 with Retry-After seconds", {"status": 429, "headers": {"Retry-After": "7"}}),
        (
            "429 with Retry-After header in lower case",
            {"status": 429, "headers": {"retry-after": "2"}},
        ),
        ("503 with Retry-After as an HTTP date", {"headers": {"Retry-After": date_30s}}),
        ("503 with Retry-After 0", {"headers": {"Retry-After": "0"}}),
        (
            "Retry-After 120 is capped at 60 s for interactive calls",
            {"status": 429, "headers": {"Retry-After": "120"}},
        ),
        (
            "outbox: the next attempt waits the full Retry-After (after the flush stopped)",
            {"status": 429, "headers": {"Retry-After": "120"}, "mode": "outbox"},
        ),
        (
            "outbox keeps retrying past the interactive budget",
            {"attempt": 9, "mode": "outbox", "jitter": 1.1},
        ),
        ("backoff is capped at 30 s (outbox, attempt 8)", {"attempt": 8, "mode": "outbox"}),
        ("unparseable Retry-After falls back to backoff", {"headers": {"Retry-After": "soon"}}),
        ("Retry-After inf is not a number of seconds", {"headers": {"Retry-After": "inf"}}),
        ("Retry-After nan is not a number of seconds", {"headers": {"Retry-After": "nan"}}),
        ("Retry-After 1e9 (an exponent) is not delay-seconds", {"headers": {"Retry-After": "1e9"}}),
        ("a negative Retry-After is not delay-seconds", {"headers": {"Retry-After": "-3"}}),
        ("Retry-After with a fraction", {"status": 429, "headers": {"Retry-After": "2.5"}}),
        (
            "Retry-After of a week is waited for a day at most (outbox)",
            {"status": 429, "headers": {"Retry-After": "604800"}, "mode": "outbox"},
        ),
        (
            "Retry-After of 400 digits is a day (outbox)",
            {"status": 429, "headers": {"Retry-After": "9" * 400}, "mode": "outbox"},
        ),
        (
            "Retry-After date in the past: retry at once",
            {"headers": {"Retry-After": "Fri, 15 Jan 2027 07:00:00 GMT"}},
        ),
        (
            "409 idempotency_key_in_progress with Retry-After",
            {"status": 409, "code": "idempotency_key_in_progress", "headers": {"Retry-After": "1"}},
        ),
        ("409 idempotency_key_reused is final", {"status": 409, "code": "idempotency_key_reused"}),
        ("409 conversation_closed is final", {"status": 409, "code": "conversation_closed"}),
        ("409 without a code is final", {"status": 409}),
        ("400 is final", {"status": 400}),
        ("401 is not a retry (session renewal is separate)", {"status": 401}),
        ("404 is final", {"status": 404}),
        ("422 is final even with Retry-After", {"status": 422, "headers": {"Retry-After": "5"}}),
        ("501 is final", {"status": 501}),
        ("POST without Idempotency-Key is never retried", {"idempotency_key": False}),
        ("PATCH is never retried", {"method": "PATCH", "idempotency_key": False}),
        (
            "GET is retried without a key",
            {"method": "GET", "idempotency_key": False, "status": 502},
        ),
        (
            "PUT is retried without a key",
            {"method": "PUT", "idempotency_key": False, "status": None},
        ),
        (
            "DELETE is retried without a key",
            {"method": "DELETE", "idempotency_key": False, "status": 503, "attempt": 2},
        ),
    ]
    vectors = []
    for name, changes in cases:
        inp = {**base, **changes}
        vectors.append({"name": name, "inputs": inp, "expected": spec_retry(inp)})
    return _doc(
        "retry_decisions",
        "Whether an SDK retries a failed attempt, and how long it waits. status null means no "
        "response at all. attempt 1 is the first retry. jitter is the value uniform(0.75, "
        "1.25) returned; delay is exact for it, delay_range covers every jitter. mode "
        "interactive: at most 4 retries, Retry-After capped at 60 s; outbox: no retry cap, "
        "and the next attempt waits the full Retry-After (at most a day), but outside the flush (a "
        "Retry-After stops the flush; outbox.md). now is the clock for HTTP-date Retry-After "
        "values.",
        vectors=vectors,
    )


# ----- pagination walks -----------------------------------------------------------------------


def walk(spec: dict[str, Any]) -> dict[str, Any]:
    """Keyset pagination (pagination.md) simulated: a position is (activity order, item)."""
    clock = 0
    keys: dict[str, int] = {}

    def bump(label: str) -> None:
        nonlocal clock
        clock += 1
        keys[label] = clock

    for label in spec["initial"]:
        bump(label)
    descending = spec["list"] == "conversations"
    cursor: int | None = None
    pages = []
    for step in spec["pages"]:
        for label in step.get("insert_before", []):
            bump(label)
        for label in step.get("touch_before", []):
            bump(label)
        ordered = sorted(keys, key=lambda k: keys[k], reverse=descending)
        if cursor is not None:
            c = cursor
            ordered = [k for k in ordered if (keys[k] < c if descending else keys[k] > c)]
        items = ordered[: spec["limit"]]
        has_next = len(ordered) > spec["limit"]
        pages.append({"items": items, "has_next": has_next})
        if not has_next:
            break
        cursor = keys[items[-1]]
    return {"pages": pages, "sequence": [i for p in pages for i in p["items"]]}


def pagination_walks() -> dict[str, Any]:
    walks: list[dict[str, Any]] = [
        {
            "name": "messages: a plain walk, oldest first",
            "list": "messages",
            "limit": 2,
            "initial": ["m1", "m2", "m3", "m4", "m5"],
            "pages": [{}, {}, {}],
        },
        {
            "name": "messages: an exact multiple of the page size ends with next_cursor null",
            "list": "messages",
            "limit": 2,
            "initial": ["m1", "m2", "m3", "m4"],
            "pages": [{}, {}],
        },
        {
            "name": "messages: replies posted while paging appear once, at the end",
            "list": "messages",
            "limit": 2,
            "initial": ["m1", "m2", "m3"],
            "pages": [{}, {"insert_before": ["m4", "m5"]}, {"insert_before": ["m6"]}],
        },
        {
            "name": "conversations: new feedback while paging is not repeated nor shifts the walk",
            "list": "conversations",
            "limit": 2,
            "initial": ["c1", "c2", "c3", "c4", "c5"],
            "pages": [{}, {"insert_before": ["c6"]}, {"insert_before": ["c7"]}],
        },
        {
            "name": "conversations: one already seen gets a reply: it moves to the front, "
            "no repeat",
            "list": "conversations",
            "limit": 2,
            "initial": ["c1", "c2", "c3", "c4", "c5"],
            "pages": [{}, {"touch_before": ["c5"]}, {}],
        },
        {
            "name": "conversations: one not yet reached gets a reply: it moves to the front "
            "and this walk misses it (refresh from the first page)",
            "list": "conversations",
            "limit": 2,
            "initial": ["c1", "c2", "c3", "c4", "c5"],
            "pages": [{}, {"touch_before": ["c1"]}, {}],
        },
        {
            "name": "conversations: limit larger than the list, one page",
            "list": "conversations",
            "limit": 25,
            "initial": ["c1", "c2", "c3"],
            "pages": [{}],
        },
    ]
    vectors = [{**w, "expected": walk(w)} for w in walks]
    invalid = [
        {
            "name": "malformed cursor",
            "query": {"cursor": "not-a-cursor"},
            "expected": {"status": 400, "code": "bad_request"},
        },
        {"name": "limit 0", "query": {"limit": "0"}, "expected": {"status_class": "4xx"}},
        {"name": "limit 101", "query": {"limit": "101"}, "expected": {"status_class": "4xx"}},
    ]
    return _doc(
        "pagination_walks",
        "Walks over a list endpoint with changes between pages. list messages: "
        "GET /v1/client/conversations/{id}/messages (oldest first); the first initial "
        "item is the conversation's first message. list conversations: GET "
        "/v1/client/conversations (newest activity first). insert_before adds items "
        "(in order) before that page is fetched; touch_before posts a reply in an existing "
        "conversation. Labels are message bodies (messages) or conversation subjects. "
        "expected.pages lists each page's items and whether next_cursor was non-null.",
        vectors=vectors,
        invalid_requests=invalid,
    )


# ----- upload plans ---------------------------------------------------------------------------


def default_limits() -> dict[str, Any]:
    from tellback_server.domain.apps.schemas import AttachmentLimits  # noqa: PLC0415

    limits = AttachmentLimits()
    return {
        kind: {"max_bytes": lim.max_bytes, "content_types": list(lim.content_types)}
        for kind in ("photo", "video", "file", "log")
        for lim in [getattr(limits, kind)]
    }


def upload_plan(inp: dict[str, Any]) -> dict[str, Any]:
    from tellback_server.domain.attachments.services import (  # noqa: PLC0415
        SINGLE_MAX,
        plan,
    )

    limits = inp["limits"]
    if limits is not None:
        ct = inp["content_type"].lower().split(";", 1)[0].strip()
        if ct not in limits["content_types"]:
            return {"outcome": "refused", "status": 415, "code": "unsupported_media_type"}
        if inp["size"] > limits["max_bytes"]:
            return {"outcome": "refused", "status": 413, "code": "payload_too_large"}
    method, part_size, part_count = plan(inp["size"])
    assert (method == "single") == (inp["size"] <= SINGLE_MAX)
    size = inp["size"]
    out: dict[str, Any] = {"outcome": "planned", "method": method}
    if method == "multipart":
        out |= {
            "part_size": part_size,
            "part_count": part_count,
            "last_part_size": size - part_size * (part_count - 1),
        }
        assert part_count == math.ceil(size / part_size)
        if part_count <= 6:
            out["parts"] = [
                {
                    "part_number": n,
                    "offset": (n - 1) * part_size,
                    "length": min(part_size, size - (n - 1) * part_size),
                }
                for n in range(1, part_count + 1)
            ]
    else:
        out["parts"] = [{"part_number": 1, "offset": 0, "length": size}]
    return out


def upload_plans() -> dict[str, Any]:
    limits = default_limits()
    gib = 1024 * MIB
    cases: list[tuple[str, str, str, int, bool]] = [
        # name, kind, content type, size, apply the app's default limits?
        ("tiny photo", "photo", "image/jpeg", 1, True),
        ("photo just under 16 MiB", "photo", "image/heic", 16 * MIB - 1, True),
        ("exactly 16 MiB is still single", "photo", "image/png", 16 * MIB, True),
        ("16 MiB + 1 byte: multipart, 3 parts", "photo", "image/png", 16 * MIB + 1, True),
        ("exactly 20 MiB photo (the default limit)", "photo", "image/jpeg", 20 * MIB, True),
        ("photo over the default limit: 413", "photo", "image/jpeg", 20 * MIB + 1, True),
        ("photo of a type not allowed: 415", "photo", "image/bmp", 1000, True),
        (
            "content type is matched case-insensitively, parameters dropped",
            "file",
            "Text/Plain; charset=utf-8",
            5000,
            True,
        ),
        ("24 MiB log: 3 parts of 8 MiB", "log", "application/zip", 24 * MIB, True),
        ("25 MiB file: last part smaller", "file", "application/pdf", 25 * MIB, True),
        ("file over 25 MiB: 413", "file", "application/pdf", 25 * MIB + 1, True),
        ("video file as a log: 415", "log", "video/mp4", 1000, True),
        ("100 MiB video", "video", "video/mp4", 100 * MIB, True),
        ("512 MiB video (default limit): 64 parts", "video", "video/quicktime", 512 * MIB, True),
        ("video over the default limit: 413", "video", "video/mp4", 512 * MIB + 1, True),
        ("5 GiB (an operator's raised limit): 640 parts", "video", "video/mp4", 5 * gib, False),
        (
            "80 GiB: parts grow past 8 MiB to stay within 10,000",
            "video",
            "video/mp4",
            80 * gib,
            False,
        ),
        ("100 GiB: 11 MiB parts", "video", "video/mp4", 100 * gib, False),
    ]
    vectors = []
    for name, kind, ct, size, apply in cases:
        inp = {
            "kind": kind,
            "content_type": ct,
            "size": size,
            "limits": limits[kind] if apply else None,
        }
        vectors.append({"name": name, "inputs": inp, "expected": upload_plan(inp)})
    return _doc(
        "upload_plans",
        "How an upload of inputs.size bytes is sent. limits are the app's limits for the kind "
        "(the server's defaults here; null: plan only, no limit check). refused: the SDK "
        "refuses locally (the server answers the same status). planned: single PUT, or "
        "multipart with part_size/part_count; part n covers bytes [offset, offset+length).",
        vectors=vectors,
    )


# ----- driver ---------------------------------------------------------------------------------

BUILDERS = {
    "identity_tokens": identity_tokens,
    "webhook_signatures": webhook_signatures,
    "push_payloads": push_payloads,
    "error_bodies": error_bodies,
    "retry_decisions": retry_decisions,
    "pagination_walks": pagination_walks,
    "upload_plans": upload_plans,
}


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def build_all() -> dict[str, str]:
    """family -> the file's exact text."""
    return {family: render(BUILDERS[family]()) for family in FAMILIES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for family, text in build_all().items():
        path = HERE / f"{family}.json"
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("stale vectors: " + ", ".join(stale) + "; run sdk-spec/vectors/generate.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
