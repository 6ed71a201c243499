"""A local, faithful fake of Google's FCM HTTP v1 API and its OAuth token endpoint.

Plain HTTP/1.1 (``h11``) on ``127.0.0.1``. It serves

* ``POST /token`` -- the OAuth 2.0 JWT-bearer grant that google-auth performs for a
  service account: form ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``
  and ``assertion=<RS256 JWT>``, verified against the key of a service account the
  fake issued (:meth:`FcmFake.service_account`) -> ``{"access_token", "expires_in",
  "token_type": "Bearer"}``, or 400 ``invalid_grant`` / ``invalid_scope`` /
  ``unsupported_grant_type``;
* ``POST /v1/projects/{project_id}/messages:send`` -- ``Authorization: Bearer`` an
  access token it issued for that project, body ``{"message": {...}, "validate_only"?}``
  -> ``{"name": "projects/<p>/messages/<id>"}``, or Google's error envelope
  ``{"error": {"code", "message", "status", "details": [FcmError, ...]}}``.

``base_url`` is ``http://127.0.0.1:<port>``: it stands in for
``https://fcm.googleapis.com``, so ``TELLBACK_FCM_ENDPOINT=<base_url>`` and pyfcm's
``FCM_END_POINT_BASE`` becomes ``f"{base_url}/v1/projects"``. The token endpoint is
the service account's own ``token_uri`` (``<base_url>/token``), which google-auth uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import h11
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tellback_server.dev.recording import Recorder

log = logging.getLogger("tellback.dev.fcm_fake")

HOST = "127.0.0.1"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/firebase.messaging",
        "https://www.googleapis.com/auth/cloud-platform",
    }
)
#: ``aud`` values Google's token endpoint accepts. google-auth always uses the first,
#: whatever the service account's ``token_uri`` says; the fake also accepts its own.
GOOGLE_TOKEN_AUDIENCES = frozenset(
    {
        "https://oauth2.googleapis.com/token",
        "https://www.googleapis.com/oauth2/v4/token",
        "https://accounts.google.com/o/oauth2/token",
    }
)
MAX_PAYLOAD_BYTES = 4096
MAX_BODY_BYTES = 1 << 20

#: FCM error code -> (HTTP status, google.rpc status, message).
FCM_ERRORS: dict[str, tuple[int, str, str]] = {
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "QUOTA_EXCEEDED": (
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Send requests' and limit "
        "'Send requests per minute' of service 'fcm.googleapis.com'.",
    ),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
}
#: Retry-After (seconds) sent when fail_next() is not given one.
DEFAULT_RETRY_AFTER: dict[str, int] = {"QUOTA_EXCEEDED": 60}

INVALID_REGISTRATION_TEXT = "The registration token is not a valid FCM registration token"
_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_SEND_PATH = re.compile(r"/v1/projects/([^/]+)/messages:send")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-:]{20,4096}")
_TOPIC_RE = re.compile(r"(/topics/)?[a-zA-Z0-9\-_.~%]{1,900}")
_TTL_RE = re.compile(r"\d{1,11}(\.\d{1,9})?s")
_AUTH_HELP = (
    "Expected OAuth 2 access token, login cookie or other valid authentication credential. "
    "See https://developers.google.com/identity/sign-in/web/devconsole-project."
)


def _with_camel(*names: str) -> frozenset[str]:
    """Proto3 JSON accepts field names as written and in lowerCamelCase."""
    out = set(names)
    for name in names:
        head, *rest = name.split("_")
        out.add(head + "".join(part.capitalize() for part in rest))
    return frozenset(out)


_BODY_FIELDS = _with_camel("message", "validate_only")
_MESSAGE_FIELDS = _with_camel(
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "token",
    "topic",
    "condition",
)
_NOTIFICATION_FIELDS = _with_camel("title", "body", "image")
_ANDROID_FIELDS = _with_camel(
    "collapse_key",
    "priority",
    "ttl",
    "restricted_package_name",
    "data",
    "notification",
    "fcm_options",
    "direct_boot_ok",
    "bandwidth_constrained_ok",
    "restricted_satellite_ok",
)
_APNS_FIELDS = _with_camel("headers", "payload", "fcm_options", "live_activity_token")
_RESERVED_DATA_KEYS = frozenset({"from", "message_type"})

FailureMode = Literal["error", "hang"]


@dataclass(frozen=True, slots=True)
class FcmMessage:
    """One ``messages:send`` request as the fake saw it, and how it answered."""

    project_id: str
    token: str | None  # message.token (None for topic/condition sends or unparsable bodies)
    message: dict[str, Any] | None  # body["message"]
    body: Any  # the whole parsed JSON body (None when not JSON)
    headers: dict[str, str]  # lower-cased names
    status: int  # HTTP status answered; 0 while the fake is told to never answer
    error_code: str | None  # FcmError errorCode, else the google.rpc status, on errors
    name: str | None  # "projects/<p>/messages/<id>" on success
    validate_only: bool
    client_email: str | None  # service account behind the access token
    received_at: float  # time.monotonic()
    received_wall: float  # time.time()
    # The error's "message" as answered (e.g. INVALID_REGISTRATION_TEXT), on errors
    error_message: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == 200 and not self.validate_only

    @property
    def notification(self) -> dict[str, Any]:
        value = (self.message or {}).get("notification")
        return value if isinstance(value, dict) else {}

    @property
    def data(self) -> dict[str, Any]:
        value = (self.message or {}).get("data")
        return value if isinstance(value, dict) else {}

    @property
    def android(self) -> dict[str, Any]:
        value = (self.message or {}).get("android")
        return value if isinstance(value, dict) else {}

    @property
    def apns(self) -> dict[str, Any]:
        value = (self.message or {}).get("apns")
        return value if isinstance(value, dict) else {}


@dataclass(slots=True)
class _Account:
    project_id: str
    client_email: str
    private_key_id: str
    public_key: rsa.RSAPublicKey


@dataclass(slots=True)
class _Grant:
    client_email: str
    project_id: str
    expires_at: float  # time.monotonic()


@dataclass(slots=True)
class _Failure:
    error_code: str
    message: str | None
    remaining: int | None
    retry_after: int | None
    token: str | None
    mode: FailureMode


class _Response:
    __slots__ = ("body", "headers", "status")

    def __init__(
        self, status: int, body: dict[str, Any], headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []


class _Invalid(Exception):
    """A request body FCM would reject with 400 INVALID_ARGUMENT."""

    def __init__(self, message: str, field: str | None = None, *, fcm: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.fcm = fcm  # FcmError detail (semantic) vs. only google.rpc.BadRequest (JSON shape)


def google_error(
    status: int,
    rpc_status: str,
    message: str,
    *,
    error_code: str | None = None,
    details: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Google's JSON error envelope, with an FcmError detail when ``error_code`` is given."""
    all_details: list[dict[str, Any]] = []
    if error_code is not None:
        all_details.append({"@type": _FCM_ERROR_TYPE, "errorCode": error_code})
    all_details.extend(details or [])
    error: dict[str, Any] = {"code": status, "message": message, "status": rpc_status}
    if all_details:
        error["details"] = all_details
    return {"error": error}


class FcmFake(Recorder[FcmMessage, _Failure]):
    """Fake FCM HTTP v1 + OAuth token endpoint on ``127.0.0.1`` (plain HTTP).

    Args:
        port: TCP port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        access_token_ttl: ``expires_in`` of issued access tokens, seconds.
        latency: seconds to wait before answering each ``messages:send``.
        max_records: keep at most this many entries in :attr:`received` /
            :attr:`attempts` (oldest dropped); counts stay exact. ``None``: keep all.
        on_request: called with every :class:`FcmMessage` as it is answered.
    """

    host = HOST

    label = "FcmFake"
    accepted_noun = "accepted messages"
    attempt_noun = "sends"

    def __init__(
        self,
        *,
        port: int = 0,
        access_token_ttl: int = 3600,
        latency: float = 0.0,
        max_records: int | None = None,
        on_request: Callable[[FcmMessage], None] | None = None,
    ) -> None:
        self._requested_port = port
        self.access_token_ttl = access_token_ttl
        self.latency = latency
        self.max_records = max_records
        self.on_request = on_request

        self._init_recorder()
        self.token_requests = 0  # calls to the token endpoint
        self.tokens_issued = 0
        self.unregistered: set[str] = set()

        self._accounts: dict[str, _Account] = {}
        self._grants: dict[str, _Grant] = {}
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping: asyncio.Event | None = None

    # lifecycle

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FcmFake is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``: replaces ``https://fcm.googleapis.com``."""
        return f"http://{HOST}:{self.port}"

    @property
    def pyfcm_endpoint_base(self) -> str:
        """Value for pyfcm's ``FCMNotification.FCM_END_POINT_BASE``."""
        return f"{self.base_url}/v1/projects"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def send_url(self, project_id: str) -> str:
        return f"{self.base_url}/v1/projects/{project_id}/messages:send"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> FcmFake:
        if self._server is not None:
            return self
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(
            self._serve_connection, HOST, self._requested_port, reuse_address=True
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        """Stop listening and close every connection (pending "hang" sends included)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._stopping is not None:
            self._stopping.set()
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        await server.wait_closed()
        self._cancel_waiters()

    async def __aenter__(self) -> FcmFake:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    # credentials and state

    def service_account(
        self, project_id: str = "tellback-dev", client_email: str | None = None
    ) -> dict[str, str]:
        """Generate a service account (RSA-2048) this fake trusts; returns its JSON dict.

        ``token_uri`` points at this fake (so it must be started). Write the dict to a
        file for ``FCMNotification(service_account_file=...)`` or pass it to
        ``service_account.Credentials.from_service_account_info(info, scopes=[...])``.
        """
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        email = client_email or (
            f"firebase-adminsdk-{secrets.token_hex(3)[:5]}@{project_id}.iam.gserviceaccount.com"
        )
        info = {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": secrets.token_hex(20),
            "private_key": private_pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**21)).zfill(21),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "",
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
            + urllib.parse.quote(email),
            "universe_domain": "googleapis.com",
        }
        return self.add_service_account(info)

    def add_service_account(self, info: dict[str, str]) -> dict[str, str]:
        """Trust an existing service-account dict (e.g. one saved by an earlier run).

        Returns a copy whose ``token_uri`` points at this fake.
        """
        key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError("service-account keys are RSA keys")
        self._accounts[info["client_email"]] = _Account(
            project_id=info["project_id"],
            client_email=info["client_email"],
            private_key_id=info.get("private_key_id", ""),
            public_key=key.public_key(),
        )
        return {**info, "token_uri": self.token_uri}

    def expire_access_tokens(self) -> None:
        """Expire every issued access token: sends get 401 with reason ACCESS_TOKEN_EXPIRED."""
        for grant in self._grants.values():
            grant.expires_at = 0.0

    @staticmethod
    def make_token() -> str:
        """A random token shaped like a real FCM registration token (163 characters)."""
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        instance = "".join(secrets.choice(alphabet) for _ in range(22))
        rest = "".join(secrets.choice(alphabet) for _ in range(134))
        return f"{instance}:APA91b{rest}"

    def unregister(self, token: str) -> None:
        """Answer 404 UNREGISTERED for ``token`` from now on."""
        self.unregistered.add(token)

    def reregister(self, token: str) -> None:
        self.unregistered.discard(token)

    # fault injection

    def fail_next(
        self,
        error_code: str,
        count: int | None = 1,
        retry_after: int | None = None,
        token: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` sends (for ``token`` only, if given) with an FCM error.

        ``error_code`` is a key of :data:`FCM_ERRORS` (UNREGISTERED, INVALID_ARGUMENT,
        SENDER_ID_MISMATCH, QUOTA_EXCEEDED, UNAVAILABLE, INTERNAL, THIRD_PARTY_AUTH_ERROR).
        ``retry_after``: None sends the service default (QUOTA_EXCEEDED: 60 s, others:
        none), 0 sends no header, n > 0 sends ``Retry-After: n``. ``count=None`` keeps
        failing until :meth:`clear_failures`. Injected answers come before any check.
        """
        if error_code not in FCM_ERRORS:
            raise ValueError(f"unknown FCM error code {error_code!r}; one of {sorted(FCM_ERRORS)}")
        if retry_after is None:
            retry_after = DEFAULT_RETRY_AFTER.get(error_code)
        elif retry_after <= 0:
            retry_after = None
        self._add_failure(_Failure(error_code, message, count, retry_after, token, "error"))

    def hang_next(self, count: int | None = 1, token: str | None = None) -> None:
        """Never answer the next ``count`` sends (the connection stays open until stop())."""
        self._add_failure(_Failure("", None, count, None, token, "hang"))

    def reset(self) -> None:
        """Forget records, failures and unregistered tokens (accounts and grants stay)."""
        self._reset_records()
        self.token_requests = 0
        self.tokens_issued = 0
        self.unregistered.clear()

    def _describe(self, record: FcmMessage) -> str:
        return f"{record.status} {record.error_code}"

    # HTTP/1.1 plumbing

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                try:
                    request = await self._read_request(conn, reader)
                except h11.RemoteProtocolError:
                    if conn.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
                        self._write(conn, writer, _Response(400, {"error": "bad request"}))
                    break
                if request is None:
                    break
                head, body = request
                response = await self._dispatch(head, body)
                if response is None:  # told to never answer
                    if self._stopping is not None:
                        await self._stopping.wait()
                    break
                self._write(conn, writer, response)
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels (a connection that did not close in time); end quietly:
            # asyncio's stream callback would log a cancelled handler as an error.
            if self._server is not None:
                raise
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read_request(
        conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request, bytes] | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                if len(body) <= MAX_BODY_BYTES:
                    body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return head, bytes(body)
            else:  # ConnectionClosed, PAUSED
                return None

    @staticmethod
    def _write(conn: h11.Connection, writer: asyncio.StreamWriter, response: _Response) -> None:
        payload = json.dumps(response.body, separators=(",", ":")).encode()
        headers = [
            ("content-type", "application/json; charset=UTF-8"),
            ("content-length", str(len(payload))),
            *response.headers,
        ]
        writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)))
        writer.write(conn.send(h11.Data(data=payload)))
        writer.write(conn.send(h11.EndOfMessage()))

    async def _dispatch(self, head: h11.Request, body: bytes) -> _Response | None:
        target = head.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        headers = {
            name.decode("ascii", "replace").lower(): value.decode("utf-8", "replace")
            for name, value in head.headers
        }
        method = head.method.decode("ascii", "replace")
        if path == "/token" and method == "POST":
            return self._token_endpoint(body)
        match = _SEND_PATH.fullmatch(path)
        if match is not None and method == "POST":
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            return self._send(urllib.parse.unquote(match.group(1)), headers, body)
        return _Response(
            404,
            google_error(
                404, "NOT_FOUND", f"The requested URL {path} was not found on this server."
            ),
        )

    # OAuth token endpoint

    def _token_endpoint(self, body: bytes) -> _Response:
        self.token_requests += 1
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        grant_type = (form.get("grant_type") or [""])[0]
        assertion = (form.get("assertion") or [""])[0]
        if grant_type != JWT_BEARER_GRANT:
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        if not assertion:
            return _oauth_error("invalid_request", "Missing required parameter: assertion")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return _oauth_error("invalid_grant", "Invalid JWT: could not parse the assertion.")
        account = self._accounts.get(str(unverified.get("iss", "")))
        if account is None:
            return _oauth_error("invalid_grant", "Invalid grant: account not found")
        if header.get("kid") not in (None, account.private_key_id):
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        short_lived = (
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
            "timeframe. Check your iat and exp values in the JWT claim."
        )
        try:
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=[*GOOGLE_TOKEN_AUDIENCES, self.token_uri],
                options={"require": ["iss", "aud", "iat", "exp"]},
                leeway=300,
            )
        except jwt.InvalidSignatureError:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
            return _oauth_error("invalid_grant", short_lived)
        except jwt.InvalidAudienceError:
            return _oauth_error(
                "invalid_grant",
                "Invalid JWT: Failed audience check. The expected value was "
                "https://oauth2.googleapis.com/token",
            )
        except jwt.InvalidTokenError as exc:
            return _oauth_error("invalid_grant", f"Invalid JWT: {exc}")
        if int(claims["exp"]) - int(claims["iat"]) > 3600:
            return _oauth_error("invalid_grant", short_lived)
        scopes = set(str(claims.get("scope", "")).split())
        if not scopes & FCM_SCOPES:
            return _oauth_error(
                "invalid_scope", "Invalid OAuth scope or ID token audience provided."
            )
        access_token = "ya29.fake-" + secrets.token_urlsafe(48)
        self._grants[access_token] = _Grant(
            account.client_email, account.project_id, time.monotonic() + self.access_token_ttl
        )
        self.tokens_issued += 1
        return _Response(
            200,
            {
                "access_token": access_token,
                "expires_in": self.access_token_ttl,
                "token_type": "Bearer",
            },
        )

    # messages:send

    def _send(self, project_id: str, headers: dict[str, str], raw: bytes) -> _Response | None:
        received_at, received_wall = time.monotonic(), time.time()
        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(raw) if raw else None
        message = body.get("message") if isinstance(body, dict) else None
        message = message if isinstance(message, dict) else None
        token = message.get("token") if message is not None else None
        token = token if isinstance(token, str) else None
        validate_only = bool(
            isinstance(body, dict) and (body.get("validate_only") or body.get("validateOnly"))
        )
        client_email: str | None = None
        name: str | None = None

        failure = self._take_failure(token) if self._failures else None
        response: _Response | None
        if failure is not None and failure.mode == "hang":
            response = None
        elif failure is not None:
            status, rpc_status, text = FCM_ERRORS[failure.error_code]
            extra = [("retry-after", str(failure.retry_after))] if failure.retry_after else []
            response = _Response(
                status,
                google_error(
                    status, rpc_status, failure.message or text, error_code=failure.error_code
                ),
                extra,
            )
        else:
            response, client_email = self._authorize(project_id, headers.get("authorization"))
            if response is None:
                response = self._check_message(body, message)
            if response is None and token is not None and token in self.unregistered:
                response = _Response(
                    404,
                    google_error(
                        404, "NOT_FOUND", FCM_ERRORS["UNREGISTERED"][2], error_code="UNREGISTERED"
                    ),
                )
            if response is None:
                message_id = (
                    "fake_message_id"
                    if validate_only
                    else f"0:{int(received_wall * 1e6)}%{secrets.token_hex(8)}"
                )
                name = f"projects/{project_id}/messages/{message_id}"
                response = _Response(200, {"name": name})

        record = FcmMessage(
            project_id=project_id,
            token=token,
            message=message,
            body=body,
            headers=headers,
            status=response.status if response is not None else 0,
            error_code=_error_code(response.body) if response is not None else None,
            name=name,
            validate_only=validate_only,
            client_email=client_email,
            received_at=received_at,
            received_wall=received_wall,
            error_message=_error_message(response.body) if response is not None else None,
        )
        self._record(record, record.accepted)
        return response

    def _authorize(
        self, project_id: str, authorization: str | None
    ) -> tuple[_Response | None, str | None]:
        if not authorization:
            return (
                _Response(
                    401,
                    google_error(
                        401,
                        "UNAUTHENTICATED",
                        f"Request is missing required authentication credential. {_AUTH_HELP}",
                        details=[_error_info("CREDENTIALS_MISSING")],
                    ),
                    [("www-authenticate", 'Bearer realm="https://accounts.google.com/"')],
                ),
                None,
            )
        scheme, _, token = authorization.partition(" ")
        grant = self._grants.get(token.strip()) if scheme.lower() == "bearer" else None
        if grant is None:
            return (
                _Response(
                    401,
                    google_error(
                        401,
                        "UNAUTHENTICATED",
                        f"Request had invalid authentication credentials. {_AUTH_HELP}",
                        details=[_error_info("ACCESS_TOKEN_TYPE_UNSUPPORTED")],
                    ),
                    [("www-authenticate", 'Bearer realm="https://accounts.google.com/"')],
                ),
                None,
            )
        if grant.expires_at <= time.monotonic():
            return (
                _Response(
                    401,
                    google_error(
                        401,
                        "UNAUTHENTICATED",
                        f"Request had invalid authentication credentials. {_AUTH_HELP}",
                        details=[_error_info("ACCESS_TOKEN_EXPIRED")],
                    ),
                    [("www-authenticate", 'Bearer realm="https://accounts.google.com/"')],
                ),
                grant.client_email,
            )
        if grant.project_id != project_id:
            return (
                _Response(
                    403,
                    google_error(
                        403,
                        "PERMISSION_DENIED",
                        "Permission 'cloudmessaging.messages.create' denied on resource "
                        f"'//cloudresourcemanager.googleapis.com/projects/{project_id}' "
                        "(or it may not exist).",
                        details=[_error_info("IAM_PERMISSION_DENIED")],
                    ),
                ),
                grant.client_email,
            )
        return None, grant.client_email

    def _check_message(self, body: Any, message: dict[str, Any] | None) -> _Response | None:
        try:
            _validate_body(body, message)
        except _Invalid as exc:
            details: list[dict[str, Any]] = []
            if exc.field is not None:
                details.append(
                    {
                        "@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": exc.field, "description": exc.message}],
                    }
                )
            return _Response(
                400,
                google_error(
                    400,
                    "INVALID_ARGUMENT",
                    exc.message,
                    error_code="INVALID_ARGUMENT" if exc.fcm else None,
                    details=details,
                ),
            )
        return None


def _validate_body(  # noqa: PLR0912 (one branch per field FCM checks)
    body: Any, message: dict[str, Any] | None
) -> None:
    if not isinstance(body, dict):
        raise _Invalid("Invalid JSON payload received. Expected an object.", fcm=False)
    for key in body:
        if key not in _BODY_FIELDS:
            raise _Invalid(_unknown(key, ""), "", fcm=False)
    if message is None:
        raise _Invalid("Request contains an invalid argument.", "message")
    _known_fields(message, _MESSAGE_FIELDS, "message")
    targets = [k for k in ("token", "topic", "condition") if message.get(k) not in (None, "")]
    if len(targets) != 1:
        raise _Invalid(
            "Exactly one of token, topic or condition must be specified.", "message", fcm=True
        )
    token = message.get("token")
    if token is not None and (not isinstance(token, str) or not _TOKEN_RE.fullmatch(token)):
        raise _Invalid(INVALID_REGISTRATION_TEXT, "message.token")
    topic = message.get("topic")
    if topic is not None and (not isinstance(topic, str) or not _TOPIC_RE.fullmatch(topic)):
        raise _Invalid("Invalid topic name", "message.topic")
    condition = message.get("condition")
    if condition is not None and not isinstance(condition, str):
        raise _Invalid(_type_error("message.condition", condition), "message.condition", fcm=False)
    _string_map(message.get("data"), "message.data", reserved=True)
    notification = message.get("notification")
    if notification is not None:
        if not isinstance(notification, dict):
            raise _Invalid(
                _type_error("message.notification", notification), "message.notification", fcm=False
            )
        _known_fields(notification, _NOTIFICATION_FIELDS, "message.notification")
        for key, value in notification.items():
            if not isinstance(value, str):
                field = f"message.notification.{key}"
                raise _Invalid(_type_error(field, value), field, fcm=False)
    android = message.get("android")
    if android is not None:
        _validate_android(android)
    apns = message.get("apns")
    if apns is not None:
        if not isinstance(apns, dict):
            raise _Invalid(_type_error("message.apns", apns), "message.apns", fcm=False)
        _known_fields(apns, _APNS_FIELDS, "message.apns")
        _string_map(apns.get("headers"), "message.apns.headers", reserved=False)
        payload = apns.get("payload")
        if payload is not None and not isinstance(payload, dict):
            raise _Invalid(
                _type_error("message.apns.payload", payload), "message.apns.payload", fcm=False
            )
        if payload is not None and len(json.dumps(payload).encode()) > MAX_PAYLOAD_BYTES:
            raise _Invalid("APNs payload is too big", "message.apns.payload")
    webpush = message.get("webpush")
    if webpush is not None and not isinstance(webpush, dict):
        raise _Invalid(_type_error("message.webpush", webpush), "message.webpush", fcm=False)
    size = len(
        json.dumps(
            {"data": message.get("data"), "notification": message.get("notification")},
            ensure_ascii=False,
        ).encode()
    )
    if size > MAX_PAYLOAD_BYTES:
        raise _Invalid("Android message is too big", "message")


def _validate_android(android: Any) -> None:
    if not isinstance(android, dict):
        raise _Invalid(_type_error("message.android", android), "message.android", fcm=False)
    _known_fields(android, _ANDROID_FIELDS, "message.android")
    priority = android.get("priority")
    if priority is not None and (
        not isinstance(priority, str) or priority.upper() not in {"NORMAL", "HIGH"}
    ):
        raise _Invalid(
            f"Invalid value at 'message.android.priority' "
            f"(type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {priority!r}",
            "message.android.priority",
            fcm=False,
        )
    ttl = android.get("ttl")
    if ttl is not None and (not isinstance(ttl, str) or not _TTL_RE.fullmatch(ttl)):
        raise _Invalid(
            "Invalid value at 'message.android.ttl' "
            f"(type.googleapis.com/google.protobuf.Duration), {ttl!r}",
            "message.android.ttl",
            fcm=False,
        )
    _string_map(android.get("data"), "message.android.data", reserved=True)
    notification = android.get("notification")
    if notification is not None and not isinstance(notification, dict):
        field = "message.android.notification"
        raise _Invalid(_type_error(field, notification), field, fcm=False)


def _known_fields(value: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in value:
        if key not in allowed:
            raise _Invalid(_unknown(key, where), where, fcm=False)


def _string_map(value: Any, field: str, *, reserved: bool) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _Invalid(_type_error(field, value), field, fcm=False)
    for index, (key, item) in enumerate(value.items()):
        if not isinstance(item, str):
            where = f"{field}[{index}].value"
            text = f"Invalid value at '{where}' (TYPE_STRING), {json.dumps(item)}"
            raise _Invalid(text, where, fcm=False)
        if reserved and (
            key in _RESERVED_DATA_KEYS or key.startswith(("google", "gcm")) or not key
        ):
            raise _Invalid(f"Invalid data payload key: {key}", field)


def _unknown(key: str, where: str) -> str:
    return (
        f"Invalid JSON payload received. Unknown name {json.dumps(key)} at '{where}': "
        "Cannot find field."
    )


def _type_error(field: str, value: Any) -> str:
    return f"Invalid value at '{field}', {json.dumps(value)[:80]}"


def _error_info(reason: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": "googleapis.com",
        "metadata": {
            "service": "fcm.googleapis.com",
            "method": "google.firebase.fcm.v1.FcmService.SendMessage",
        },
    }


def _error_code(body: dict[str, Any]) -> str | None:
    error = body.get("error")
    if not isinstance(error, dict):
        return None
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            return str(detail["errorCode"])
    status = error.get("status")
    return str(status) if status else None


def _error_message(body: dict[str, Any]) -> str | None:
    error = body.get("error")
    if not isinstance(error, dict) or not error.get("message"):
        return None
    return str(error["message"])


def _oauth_error(error: str, description: str) -> _Response:
    return _Response(400, {"error": error, "error_description": description})
