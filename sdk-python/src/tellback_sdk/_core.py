"""What ``Client`` and ``AsyncClient`` share: configuration, request building, decoding,
session persistence and identity bookkeeping. Only the I/O loop differs between them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import platform
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec

from tellback_sdk._retry import DEFAULT_POLICY, RetryPolicy, parse_retry_after
from tellback_sdk._store import OWNER, Store
from tellback_sdk._version import SDK_NAME
from tellback_sdk.types import ClientConfig, DeviceInfo, SessionCreated

T = TypeVar("T")

ANONYMOUS = "anonymous"
# Renew a little before the server would refuse, so a request never races the expiry.
EXPIRY_MARGIN = dt.timedelta(minutes=5)
CONFIG_TTL = 60.0  # limits change rarely; a minute keeps uploads from re-asking
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One logical request: its retries reuse these exact bytes and this key."""

    method: str
    path: str
    content: Any = None  # bytes, or a callable making a fresh body stream per attempt
    params: Mapping[str, str | int] | None = None
    idempotency_key: str | None = None
    auth: bool = True  # a client endpoint: needs the session's bearer token
    safe_to_repeat: bool = False
    headers: Mapping[str, str] | None = None

    @staticmethod
    def create(path: str, body: Any, key: str | None = None) -> RequestSpec:
        """A POST that creates: serialised once, with a key made before the first attempt."""
        return RequestSpec(
            "POST", path, content=encode(body), idempotency_key=key or new_idempotency_key()
        )


@dataclass(frozen=True, slots=True)
class SessionState:
    token: str
    expires_at: dt.datetime
    identity: str  # "anonymous" or "user:<sub>"
    user_id: str

    def fresh(self) -> bool:
        return self.expires_at - EXPIRY_MARGIN > dt.datetime.now(dt.UTC)


# A JSON escape of U+0000: ``\u0000`` after an even run of backslashes (an odd run
# makes it text: ``\\u0000`` is a backslash, then "u0000").
_NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def encode(body: Any) -> bytes:
    """The JSON of ``body``, without the NUL character (U+0000) in any string: the
    server refuses it (PostgreSQL cannot store it), and it comes from log excerpts
    and device strings, not from what a person typed."""
    raw = _encoder.encode(body)
    if b"\\u0000" in raw:
        raw = _NUL_ESCAPE.sub(rb"\1", raw)
    return raw


@dataclass(frozen=True, slots=True)
class OutboxCalls:
    """Calls made for the outbox (its sessions and uploads included) never sleep on a
    ``Retry-After``: the flush stops and the next one waits it out (outbox.md).
    ``deadline`` (``time.monotonic()``): no retry is waited for past it (logout)."""

    deadline: float | None = None


_OUTBOX_CALLS: ContextVar[OutboxCalls | None] = ContextVar("tellback_outbox_calls", default=None)


@contextmanager
def outbox_calls(deadline: float | None = None) -> Iterator[None]:
    outer = _OUTBOX_CALLS.get()
    if outer is not None and outer.deadline is not None:
        deadline = outer.deadline if deadline is None else min(deadline, outer.deadline)
    token = _OUTBOX_CALLS.set(OutboxCalls(deadline))
    try:
        yield
    finally:
        _OUTBOX_CALLS.reset(token)


def call_timeout() -> Any:
    """The timeout of one request: the client's own, or, for an outbox call with a
    deadline (logout), no more than what is left of it, so that one slow request cannot
    hold the logout past it."""
    calls = _OUTBOX_CALLS.get()
    if calls is None or calls.deadline is None:
        return httpx.USE_CLIENT_DEFAULT
    left = max(calls.deadline - time.monotonic(), 0.1)
    return httpx.Timeout(left) if left < 30.0 else httpx.USE_CLIENT_DEFAULT


def retry_wait(delay: float | None, status: int | None, headers: Mapping[str, str]) -> float | None:
    """``delay`` (from ``should_retry``), or None when an outbox call must stop instead of
    waiting: the server asked for a pause, or the wait would pass the deadline."""
    calls = _OUTBOX_CALLS.get()
    if delay is None or calls is None:
        return delay
    if status is not None and parse_retry_after(headers) is not None:
        return None
    if calls.deadline is not None and time.monotonic() + delay > calls.deadline:
        return None
    return delay


def decode(response: httpx.Response, cast: type[T]) -> T:
    return msgspec.json.decode(response.content, type=cast)


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def identity_of(user_token: str | None) -> str:
    """Who a token names, for deciding whether a stored session still fits.

    The JWT is read without verifying it: the server verifies; the SDK only needs to
    notice that a different user logged in.
    """
    if user_token is None:
        return ANONYMOUS
    try:
        payload = user_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return f"user:{claims['sub']}"
    except (IndexError, ValueError, KeyError, TypeError):
        return f"user:?{uuid.uuid4().hex}"  # unreadable: never matches a stored session


def default_device() -> DeviceInfo:
    return DeviceInfo(
        platform="other",
        model=platform.machine() or None,
        os_version=f"{platform.system()} {platform.release()}".strip()[:100] or None,
        timezone=time.strftime("%Z") or None,
        sdk=SDK_NAME,
    )


class ClientCore:
    """State and pure helpers shared by the sync and async clients."""

    def __init__(
        self,
        *,
        base_url: str,
        app_key: str,
        data_dir: str | Path | None,
        device: DeviceInfo | None,
        max_retries: int,
        retry_policy: RetryPolicy | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.app_key = app_key
        self.store = Store(data_dir)
        self.installation_id = self.store.installation_id()
        # Made now, not on first use: two threads queueing at first launch must not each
        # make an owner (the loser's item would never be flushed, listed or purged).
        self.store.setdefault(OWNER, uuid.uuid4().hex)
        device = device or default_device()
        if device.sdk is None:
            device = msgspec.structs.replace(device, sdk=SDK_NAME)
        self.device = device
        self.policy = (retry_policy or DEFAULT_POLICY).with_retries(max_retries)
        # Interactive calls cap a server's Retry-After; the outbox never sleeps on it
        # (retry_wait) but stops the flush and tries again after the full time.
        self.outbox_policy = self.policy.for_outbox()
        self._session_key = f"session:{self.base_url}:{app_key}"
        self.session: SessionState | None = self._load_session()
        self.config_cache: tuple[float, ClientConfig] | None = None

    def cached_config(self) -> ClientConfig | None:
        if self.config_cache is None or time.monotonic() - self.config_cache[0] > CONFIG_TTL:
            return None
        return self.config_cache[1]

    def cache_config(self, config: ClientConfig) -> ClientConfig:
        self.config_cache = (time.monotonic(), config)
        return config

    # ----- the owner of local state: changes on logout / another user ---------------------

    @property
    def owner(self) -> str:
        owner = self.store.get(OWNER)
        if owner is None:  # only if the row was removed behind our back
            owner = self.store.setdefault(OWNER, uuid.uuid4().hex)
        return str(owner)

    # ----- sessions -----------------------------------------------------------------------

    def _load_session(self) -> SessionState | None:
        raw = self.store.get(self._session_key)
        if not isinstance(raw, dict):
            return None
        try:
            return SessionState(
                token=raw["token"],
                expires_at=dt.datetime.fromisoformat(raw["expires_at"]),
                identity=raw["identity"],
                user_id=raw["user_id"],
            )
        except (KeyError, ValueError, TypeError):
            return None

    def session_spec(self, user_token: str | None) -> RequestSpec:
        body: dict[str, Any] = {
            "app_key": self.app_key,
            "installation_id": self.installation_id,
            "device": self.device,
        }
        if user_token is not None:
            body["user_token"] = user_token
        # Repeating a session start is harmless (it only yields another token for the
        # same user), so it may retry without an Idempotency-Key.
        return RequestSpec(
            "POST", "/v1/client/sessions", content=encode(body), auth=False, safe_to_repeat=True
        )

    def save_session(self, response: httpx.Response, identity: str) -> SessionState:
        created = decode(response, SessionCreated)
        expires_at = created.expires_at
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=dt.UTC)
        state = SessionState(created.session_token, expires_at, identity, created.user.id)
        self.store.set(
            self._session_key,
            {
                "token": state.token,
                "expires_at": state.expires_at.isoformat(),
                "identity": identity,
                "user_id": state.user_id,
            },
        )
        self.session = state
        return state

    def forget_session(self) -> None:
        self.session = None
        self.store.set(self._session_key, None)

    # ----- building requests --------------------------------------------------------------

    def headers(self, spec: RequestSpec, token: str | None) -> dict[str, str]:
        headers = {"User-Agent": SDK_NAME, "Accept": "application/json"}
        if spec.content is not None and spec.path.startswith("/"):
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if spec.idempotency_key is not None:
            headers["Idempotency-Key"] = spec.idempotency_key
        if spec.headers:
            headers.update(spec.headers)
        return headers


def resolve_token(source: str | Callable[[], Any] | None) -> Any:
    """The token, or what the callable returned (maybe an awaitable: the async client awaits)."""
    if source is None or isinstance(source, str):
        return source
    return source()
