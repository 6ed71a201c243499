"""The synchronous client: plain blocking httpx, no event loop behind it."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from tellback_sdk._core import (
    ANONYMOUS,
    DEFAULT_TIMEOUT,
    ClientCore,
    RequestSpec,
    SessionState,
    call_timeout,
    identity_of,
    outbox_calls,
    retry_wait,
)
from tellback_sdk._outbox_store import OutboxStore
from tellback_sdk._retry import RetryPolicy, may_repeat, should_retry
from tellback_sdk._sse import forget_positions
from tellback_sdk.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    IdentityRequiredError,
    make_status_error,
)
from tellback_sdk.resources.attachments import Attachments
from tellback_sdk.resources.config import Config
from tellback_sdk.resources.conversations import Conversations, QueueingConversations
from tellback_sdk.resources.devices import Devices
from tellback_sdk.resources.events import Events, EventStream
from tellback_sdk.resources.me import Me
from tellback_sdk.resources.messages import Messages, QueueingMessages
from tellback_sdk.resources.outbox import Outbox
from tellback_sdk.types import DeviceInfo

SyncTokenSource = str | Callable[[], str]
# How long logout (or identifying as someone else) tries to send the user's queue first.
FLUSH_TIMEOUT = 10.0
log = logging.getLogger("tellback_sdk")


@dataclass(frozen=True, slots=True)
class LogoutResult:
    """``discarded``: queued items of the previous user that could not be sent first
    (returned by ``logout()``, and by ``identify()`` when it replaces another user)."""

    discarded: int


def forget_user(core: ClientCore, outbox: OutboxStore) -> int:
    """Logout's local part, for both clients: the previous user's unsent items go (never
    sent as, or shown to, the next user); how many is reported, and logged, so none is
    lost silently. Then a new owner for what comes next, and no stream positions."""
    discarded = outbox.purge(core.owner, successor=uuid.uuid4().hex)
    if discarded:
        log.warning("tellback.outbox_discarded_at_logout", extra={"count": discarded})
    forget_positions(core)
    return discarded


class SyncClientBase:
    """Tellback end-user client. Sessions, retries and idempotency keys are handled here.

    ``user_token``: an identity JWT from the app's backend, or a callable returning a
    fresh one (called whenever a session must be created). ``data_dir`` keeps the
    installation id, the session, resumable uploads and the outbox across restarts.
    """

    def __init__(
        self,
        base_url: str,
        app_key: str,
        *,
        user_token: SyncTokenSource | None = None,
        data_dir: str | Path | None = None,
        device: DeviceInfo | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 4,
        retry_policy: RetryPolicy | None = None,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._core = ClientCore(
            base_url=base_url,
            app_key=app_key,
            data_dir=data_dir,
            device=device,
            max_retries=max_retries,
            retry_policy=retry_policy,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, transport=transport)
        self._token_source: SyncTokenSource | None = user_token
        self._reconciled = False
        self._identity_lock = threading.RLock()
        self._session_lock = threading.Lock()
        self.config = Config(self)
        self.me = Me(self)
        self.devices = Devices(self)
        self.attachments = Attachments(self)
        self.outbox = Outbox(self)
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self.events = Events(self)
        self._init_create_resources()

    def _init_create_resources(self) -> None:
        raise NotImplementedError

    # ----- lifecycle ----------------------------------------------------------------------

    @property
    def installation_id(self) -> str:
        return self._core.installation_id

    def close(self) -> None:
        for stream in list(self._streams):
            stream.close()
        if self._owns_http:
            self._http.close()
        self._core.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----- the request loop ---------------------------------------------------------------

    def _call(self, spec: RequestSpec, policy: RetryPolicy | None = None) -> httpx.Response:
        """Send ``spec`` until it succeeds, fails for good, or the retry budget is spent."""
        policy = policy or self._core.policy
        repeatable = may_repeat(spec.method, spec.idempotency_key, spec.safe_to_repeat)
        renewed = False
        attempt = 0
        while True:
            token = self._ensure_session().token if spec.auth else None
            status: int | None = None
            headers: httpx.Headers = httpx.Headers()
            code: str | None = None
            error: APIError
            try:
                response = self._send(spec, token)
            except httpx.TimeoutException as exc:
                error = APITimeoutError()
                error.__cause__ = exc
            except httpx.TransportError as exc:
                error = APIConnectionError(f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
            else:
                if response.is_success:
                    return response
                status_error = make_status_error(response)
                if response.status_code == 401 and spec.auth and not renewed:
                    renewed = True
                    self._renew_session(token)
                    continue
                error, status, headers, code = (
                    status_error,
                    response.status_code,
                    response.headers,
                    status_error.code,
                )
            attempt += 1
            delay = should_retry(status, headers, attempt, code=code, policy=policy)
            delay = retry_wait(delay, status, headers)
            if not repeatable or delay is None:
                raise error
            time.sleep(delay)

    def _send(self, spec: RequestSpec, token: str | None) -> httpx.Response:
        content = spec.content() if callable(spec.content) else spec.content
        url = self._core.base_url + spec.path if spec.path.startswith("/") else spec.path
        return self._http.request(
            spec.method,
            url,
            content=content,
            params=spec.params,
            headers=self._core.headers(spec, token),
            timeout=call_timeout(),
        )

    # ----- sessions and identity ----------------------------------------------------------

    def _ensure_session(self) -> SessionState:
        if not self._reconciled:
            with self._identity_lock:
                if not self._reconciled:
                    self._reconciled = True
                    self._reconcile()
        with self._session_lock:
            session = self._core.session
            if session is None or not session.fresh():
                session = self._start_session()
            return session

    def _renew_session(self, failed_token: str | None) -> None:
        with self._session_lock:
            current = self._core.session
            if current is None or current.token == failed_token:
                self._start_session()

    def _start_session(self) -> SessionState:
        stored = self._core.session
        source = self._token_source
        if source is None:
            source = self._core.store.get("user_token")
            if source is None and stored is not None and stored.identity != ANONYMOUS:
                raise IdentityRequiredError(
                    "the identified user's session must be renewed: pass user_token"
                )
        user_token = source() if callable(source) else source
        spec = self._core.session_spec(user_token)
        response = self._call(spec)
        return self._core.save_session(response, identity_of(user_token))

    def _reconcile(self) -> None:
        """Make the stored session fit the ``user_token`` given to the constructor."""
        stored = self._core.session
        source = self._token_source
        if source is None or stored is None:
            return
        if callable(source):
            if stored.identity == ANONYMOUS:
                self._identify_locked(source)
            return
        if stored.identity != identity_of(source):
            self._identify_locked(source)

    def identify(self, user_token: SyncTokenSource) -> LogoutResult:
        """Log in: from now on the session belongs to the token's user.

        From an anonymous session the server merges the installation's conversations,
        uploads and idempotency keys into the user, so queued items go out unchanged as
        the user. From another user's session this is a logout of that user first; the
        result says how many of their queued items could not be sent and were deleted.
        """
        with self._identity_lock:
            self._reconciled = True
            return self._identify_locked(user_token)

    def _identify_locked(self, user_token: SyncTokenSource) -> LogoutResult:
        token = user_token() if callable(user_token) else user_token
        target = identity_of(token)
        current = self._core.session.identity if self._core.session else ANONYMOUS
        if current == target and self._core.session is not None:
            self._set_token_source(user_token)
            return LogoutResult(discarded=0)
        self._flush_quietly()
        discarded = 0
        # From anonymous, queued items stay as they are (frozen bodies, attachment ids,
        # upload state): the server's merge moves the anonymous user's uploads and
        # idempotency keys to the identified user, so a resend replays. From another
        # identified user, this is that user's logout.
        if current != ANONYMOUS:
            discarded = self._forget_user()
        self._set_token_source(user_token)
        with self._session_lock:
            spec = self._core.session_spec(token)
            self._core.save_session(self._call(spec), target)
        return LogoutResult(discarded=discarded)

    def _forget_user(self) -> int:
        return forget_user(self._core, self.outbox._store)

    def logout(self, *, flush_timeout: float = FLUSH_TIMEOUT) -> LogoutResult:
        """Forget the user: queued items are sent first if possible (for at most
        ``flush_timeout`` seconds; a server asking for a pause ends it at once), the rest
        are dropped (they must never be sent as, or shown to, the next user)."""
        with self._identity_lock:
            self._reconciled = True
            if self._core.session is not None:
                self._flush_quietly(flush_timeout)
            discarded = self._forget_user()
            self._set_token_source(None)
            with self._session_lock:
                self._core.forget_session()
                # Offline, or the server asks for a pause: the next call starts the
                # anonymous session; the user is logged out locally either way.
                with contextlib.suppress(APIError), outbox_calls(time.monotonic() + flush_timeout):
                    self._start_session()
            return LogoutResult(discarded=discarded)

    def _set_token_source(self, source: SyncTokenSource | None) -> None:
        self._token_source = source
        self._core.store.set("user_token", source if isinstance(source, str) else None)

    def _flush_quietly(self, seconds: float = FLUSH_TIMEOUT) -> None:
        """Send what can be sent before the user changes; never waits past ``seconds``."""
        with contextlib.suppress(APIError):
            self.outbox._flush(time.monotonic() + seconds)


class Client(SyncClientBase):
    """``conversations.create`` / ``messages.create`` send at once unless ``queue=True``."""

    conversations: Conversations
    messages: Messages

    def _init_create_resources(self) -> None:
        self.conversations = Conversations(self)
        self.messages = Messages(self)


class MobileClient(SyncClientBase):
    """Like ``Client``, but feedback goes through the offline outbox unless ``queue=False``
    (the right default on a phone: the user's words are kept even without a network)."""

    conversations: QueueingConversations
    messages: QueueingMessages

    def _init_create_resources(self) -> None:
        self.conversations = QueueingConversations(self)
        self.messages = QueueingMessages(self)
