"""Sending to APNs (aioapns) and FCM (pyfcm), with one outcome vocabulary.

APNs: one aioapns client per app and environment, kept open (HTTP/2,
multiplexed). Its provider JWT (ES256) is minted per connection and reused for
30 minutes, within Apple's "not more often than every 20 minutes, before 60"
window. Every send is wrapped in a timeout because aioapns waits forever for
an error response that has no JSON body.

FCM: pyfcm builds the payload, holds the service-account credentials and
refreshes OAuth tokens; we POST through its session ourselves, because its
`notify()` sleeps on `Retry-After` and recurses without bound, and its
default adapter retries 502/503 inside the call. Our adapter never retries:
the jobs outbox does, with backoff. pyfcm is synchronous, so each send runs in
a thread of FCM's own pool (a slow FCM never takes the threads that storage
calls run on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from aioapns import APNs, NotificationRequest, PushType
from aioapns.connection import APNsProductionClientProtocol
from aioapns.exceptions import ConnectionError as ApnsConnectionError
from aioapns.exceptions import MaxAttemptsExceeded
from google.auth.exceptions import TransportError
from google.oauth2 import service_account
from pyfcm import FCMNotification
from requests.adapters import HTTPAdapter
from requests.exceptions import RequestException

from tellback_server.settings import Settings

log = structlog.get_logger("tellback.push")

SEND_TIMEOUT_S = 10.0
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"

APNS_INVALID_TOKEN = {"BadDeviceToken", "Unregistered", "DeviceTokenNotForTopic"}
APNS_AUTH = {
    "InvalidProviderToken",
    "MissingProviderToken",
    "BadTopic",
    "TopicDisallowed",
    "MissingTopic",
    "BadCertificate",
    "BadCertificateEnvironment",
    "Forbidden",
}
FCM_INVALID_TOKEN = {"UNREGISTERED", "SENDER_ID_MISMATCH"}
FCM_RETRY = {"UNAVAILABLE", "INTERNAL", "QUOTA_EXCEEDED"}
FCM_AUTH = {"THIRD_PARTY_AUTH_ERROR", "PERMISSION_DENIED", "UNAUTHENTICATED"}
# Token answers that every device gets when the app's push settings are wrong (a typo in
# the APNs topic, a service account of another Firebase project, an endpoint that is not
# FCM's): they deactivate a device only once the same client has delivered to another.
# An Unregistered/410 or FCM's UNREGISTERED is about the token alone: the token was valid.
# (NOT_FOUND: an FCM 404 that does not say UNREGISTERED.)
SUSPECT_TOKEN_REASONS = frozenset(
    {"BadDeviceToken", "DeviceTokenNotForTopic", "SENDER_ID_MISMATCH", "NOT_FOUND"}
)
# FCM's sends are blocking calls: their own threads, as many as sends in flight are useful.
_FCM_THREADS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="tellback-fcm")


@dataclass(frozen=True, slots=True)
class Outcome:
    """sent | invalid_token | retry | auth_error | failed (permanent, not the token's fault)."""

    kind: str
    http_status: int | None = None
    reason: str | None = None
    retry_after: float | None = None
    latency_ms: float | None = None


class _AckingProtocol(APNsProductionClientProtocol):
    """aioapns's protocol, returning HTTP/2 flow-control credit for response bodies.

    aioapns never acknowledges DATA frames, so after ~64 KiB of error bodies on one
    connection (about 1,300 `410 Unregistered` answers in a fan-out to stale tokens)
    APNs may not send another body and every later error on that connection hangs.
    """

    def on_data_received(self, raw_data: bytes, stream_id: int) -> None:
        with contextlib.suppress(Exception):  # the stream may already be closed
            self.conn.acknowledge_received_data(len(raw_data), stream_id)
        super().on_data_received(raw_data, stream_id)


class ApnsSender:
    def __init__(self, creds: dict[str, str], sandbox: bool, settings: Settings) -> None:
        self.proven = False  # (set once this client delivered: see SUSPECT_TOKEN_REASONS)
        ssl_context = ssl.create_default_context()
        if settings.apns_ca_file is not None:
            ssl_context.load_verify_locations(cafile=str(settings.apns_ca_file))
        ssl_context.set_alpn_protocols(["h2"])
        self.topic = creds["topic"]
        self.client = APNs(
            key=creds["private_key"],
            key_id=creds["key_id"],
            team_id=creds["team_id"],
            topic=creds["topic"],
            use_sandbox=sandbox,
            ssl_context=ssl_context,
            max_connection_attempts=1,
            err_func=_quiet,
        )
        host = settings.apns_host or (
            "api.sandbox.push.apple.com" if sandbox else "api.push.apple.com"
        )
        port = settings.apns_port or 443
        # aioapns reads host and port from the protocol class; give this client its own.
        protocol = type(
            "TellbackApnsProtocol",
            (_AckingProtocol,),
            {"APNS_SERVER": host, "APNS_PORT": port},
        )
        self.client.pool.protocol_class = protocol

    async def send(
        self,
        token: str,
        payload: dict[str, Any],
        *,
        collapse_id: str,
        ttl_s: int,
        notification_id: uuid.UUID | None = None,
    ) -> Outcome:
        """``notification_id``: the apns-id, the same on every attempt of one notification
        (APNs answers with it, so a retry can be matched with the first try)."""
        request = NotificationRequest(
            device_token=token,
            message=payload,
            notification_id=None if notification_id is None else str(notification_id),
            time_to_live=ttl_s,
            collapse_key=collapse_id[:64],
            push_type=PushType.ALERT,
            priority=10,
        )
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(self.client.send_notification(request), SEND_TIMEOUT_S)
        except TimeoutError:
            # aioapns keeps the dead request's state on the connection: start afresh.
            await self.close()
            return Outcome("retry", None, f"no answer from APNs within {SEND_TIMEOUT_S:g}s")
        except (ApnsConnectionError, MaxAttemptsExceeded, OSError, ssl.SSLError) as exc:
            return Outcome("retry", None, f"cannot reach APNs ({type(exc).__name__})")
        latency = (time.perf_counter() - started) * 1000
        status = int(result.status) if str(result.status).isdigit() else None
        reason = result.description or None
        if status == 200:
            return Outcome("sent", 200, None, latency_ms=latency)
        return _apns_outcome(status, reason, latency)

    async def close(self) -> None:
        for connection in list(self.client.pool.connections):
            connection.close()


def _apns_outcome(status: int | None, reason: str | None, latency: float) -> Outcome:
    if status == 410 or reason in APNS_INVALID_TOKEN:
        return Outcome("invalid_token", status, reason, latency_ms=latency)
    if reason == "ExpiredProviderToken":
        return Outcome("expired_provider_token", status, reason, latency_ms=latency)
    if status == 403 or reason in APNS_AUTH:
        return Outcome("auth_error", status, reason, latency_ms=latency)
    if status in {429, 500, 503} or status is None:
        return Outcome("retry", status, reason or "APNs is unavailable", latency_ms=latency)
    return Outcome("failed", status, reason, latency_ms=latency)


async def _quiet(_request: NotificationRequest, _result: Any) -> None:
    """aioapns logs every failed send at ERROR; we record outcomes ourselves."""


class FcmSender:
    def __init__(self, service_account_info: dict[str, Any], settings: Settings) -> None:
        self.proven = False  # (set once this client delivered: see SUSPECT_TOKEN_REASONS)
        credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            service_account_info, scopes=[FCM_SCOPE]
        )
        self.client = FCMNotification(
            credentials=credentials,
            project_id=service_account_info.get("project_id"),
            adapter=HTTPAdapter(max_retries=0),
        )
        if settings.fcm_endpoint is not None:
            self.client.FCM_END_POINT_BASE = f"{settings.fcm_endpoint}/v1/projects"

    def _post(self, message: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        body = self.client.json_dumps({"message": message})
        session = self.client.requests_session
        response = session.post(self.client.fcm_end_point, data=body, timeout=SEND_TIMEOUT_S)
        if response.status_code == 401 and self.client._is_access_token_expired(response):
            self.client.thread_local.token_expiry = 0
            response = self.client.requests_session.post(
                self.client.fcm_end_point, data=body, timeout=SEND_TIMEOUT_S
            )
        try:
            data = response.json()
        except ValueError:
            data = {}
        return (
            response.status_code,
            data if isinstance(data, dict) else {},
            response.headers.get("Retry-After"),
        )

    async def send(self, message: dict[str, Any]) -> Outcome:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            status, data, retry_after = await loop.run_in_executor(
                _FCM_THREADS, self._post, message
            )
        except RequestException as exc:
            return Outcome("retry", None, f"cannot reach FCM ({type(exc).__name__})")
        except Exception as exc:  # noqa: BLE001 (credential refresh errors surface as anything)
            # pyfcm raises InvalidDataError from whatever refreshing the OAuth token raised.
            cause = exc.__cause__ or exc.__context__ or exc
            if isinstance(cause, TransportError | RequestException | OSError):
                return Outcome(
                    "retry", None, f"cannot reach Google's token endpoint ({type(cause).__name__})"
                )
            return Outcome(
                "auth_error", None, f"FCM credentials refused: {str(cause)[:200] or type(cause)}"
            )
        latency = (time.perf_counter() - started) * 1000
        if status == 200:
            return Outcome("sent", 200, None, latency_ms=latency)
        code = _fcm_error_code(data)
        delay = float(retry_after) if retry_after and retry_after.isdigit() else None
        if code in FCM_INVALID_TOKEN or status == 404:  # (a bare 404: SUSPECT_TOKEN_REASONS)
            return Outcome("invalid_token", status, code or "NOT_FOUND", latency_ms=latency)
        if code == "INVALID_ARGUMENT" and _about_token(data):
            return Outcome("invalid_token", status, code, latency_ms=latency)
        if code in FCM_RETRY or status in {429, 500, 502, 503, 504}:
            return Outcome("retry", status, code or f"HTTP {status}", delay, latency)
        if code in FCM_AUTH or status in {401, 403}:
            return Outcome("auth_error", status, code or f"HTTP {status}", latency_ms=latency)
        return Outcome("failed", status, code or f"HTTP {status}", latency_ms=latency)

    async def close(self) -> None:
        return None


def _fcm_error_code(data: dict[str, Any]) -> str | None:
    error = data.get("error")
    if not isinstance(error, dict):
        return None
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            return str(detail["errorCode"])
    status = error.get("status")
    return str(status) if status else None


def _about_token(data: dict[str, Any]) -> bool:
    text = json.dumps(data).lower()
    return "token" in text and (
        "registration" in text or "not a valid" in text or "message.token" in text
    )
