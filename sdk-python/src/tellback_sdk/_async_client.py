"""The asyncio client: the same behaviour as ``Client`` over ``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from tellback_sdk._client import FLUSH_TIMEOUT, LogoutResult, forget_user
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
from tellback_sdk._retry import RetryPolicy, may_repeat, should_retry
from tellback_sdk.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    IdentityRequiredError,
    make_status_error,
)
from tellback_sdk.resources.attachments import AsyncAttachments
from tellback_sdk.resources.config import AsyncConfig
from tellback_sdk.resources.conversations import AsyncConversations, AsyncQueueingConversations
from tellback_sdk.resources.devices import AsyncDevices
from tellback_sdk.resources.events import AsyncEvents, AsyncEventStream
from tellback_sdk.resources.me import AsyncMe
from tellback_sdk.resources.messages import AsyncMessages, AsyncQueueingMessages
from tellback_sdk.resources.outbox import AsyncOutbox
from tellback_sdk.types import DeviceInfo

AsyncTokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]
log = logging.getLogger("tellback_sdk")


class AsyncClientBase:
    """Async twin of ``Client``. With ``auto_flush`` (default) the outbox is flushed in a
    background task when the client starts and after each queued item, backing off while
    offline; ``close()`` stops it."""

    def __init__(
        self,
        base_url: str,
        app_key: str,
        *,
        user_token: AsyncTokenSource | None = None,
        data_dir: str | Path | None = None,
        device: DeviceInfo | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 4,
        retry_policy: RetryPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        auto_flush: bool = True,
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
        self._http = http_client or httpx.AsyncClient(timeout=timeout, transport=transport)
        self._token_source: AsyncTokenSource | None = user_token
        self._reconciled = False
        # Created lazily: the client may be built outside the loop that uses it.
        self._identity_lock_: asyncio.Lock | None = None
        self._session_lock_: asyncio.Lock | None = None
        self.auto_flush = auto_flush
        self.config = AsyncConfig(self)
        self.me = AsyncMe(self)
        self.devices = AsyncDevices(self)
        self.attachments = AsyncAttachments(self)
        self.outbox = AsyncOutbox(self)
        self._streams: weakref.WeakSet[AsyncEventStream] = weakref.WeakSet()
        self.events = AsyncEvents(self)
        self._init_create_resources()

    def _init_create_resources(self) -> None:
        raise NotImplementedError

    @property
    def _identity_lock(self) -> asyncio.Lock:
        if self._identity_lock_ is None:
            self._identity_lock_ = asyncio.Lock()
        return self._identity_lock_

    @property
    def _session_lock(self) -> asyncio.Lock:
        if self._session_lock_ is None:
            self._session_lock_ = asyncio.Lock()
        return self._session_lock_

    # ----- lifecycle ----------------------------------------------------------------------

    @property
    def installation_id(self) -> str:
        return self._core.installation_id

    async def start(self) -> None:
        """Start background flushing (``async with`` does this)."""
        if self.auto_flush:
            self.outbox.start()

    async def close(self) -> None:
        for stream in list(self._streams):
            await stream.aclose()
        await self.outbox.stop()
        if self._owns_http:
            await self._http.aclose()
        self._core.store.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ----- the request loop ---------------------------------------------------------------

    async def _call(self, spec: RequestSpec, policy: RetryPolicy | None = None) -> httpx.Response:
        policy = policy or self._core.policy
        repeatable = may_repeat(spec.method, spec.idempotency_key, spec.safe_to_repeat)
        renewed = False
        attempt = 0
        while True:
            token = (await self._ensure_session()).token if spec.auth else None
            status: int | None = None
            headers: httpx.Headers = httpx.Headers()
            code: str | None = None
            error: APIError
            try:
                response = await self._send(spec, token)
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
                    await self._renew_session(token)
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
            await asyncio.sleep(delay)

    async def _send(self, spec: RequestSpec, token: str | None) -> httpx.Response:
        content = spec.content() if callable(spec.content) else spec.content
        url = self._core.base_url + spec.path if spec.path.startswith("/") else spec.path
        return await self._http.request(
            spec.method,
            url,
            content=content,
            params=spec.params,
            headers=self._core.headers(spec, token),
            timeout=call_timeout(),
        )

    # ----- sessions and identity ----------------------------------------------------------

    async def _ensure_session(self) -> SessionState:
        if not self._reconciled:
            async with self._identity_lock:
                if not self._reconciled:
                    self._reconciled = True
                    await self._reconcile()
        async with self._session_lock:
            session = self._core.session
            if session is None or not session.fresh():
                session = await self._start_session()
            return session

    async def _renew_session(self, failed_token: str | None) -> None:
        async with self._session_lock:
            current = self._core.session
            if current is None or current.token == failed_token:
                await self._start_session()

    async def _resolve(self, source: AsyncTokenSource | None) -> str | None:
        if source is None or isinstance(source, str):
            return source
        value = source()
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _start_session(self) -> SessionState:
        stored = self._core.session
        source = self._token_source
        if source is None:
            source = self._core.store.get("user_token")
            if source is None and stored is not None and stored.identity != ANONYMOUS:
                raise IdentityRequiredError(
                    "the identified user's session must be renewed: pass user_token"
                )
        user_token = await self._resolve(source)
        response = await self._call(self._core.session_spec(user_token))
        return self._core.save_session(response, identity_of(user_token))

    async def _reconcile(self) -> None:
        stored = self._core.session
        source = self._token_source
        if source is None or stored is None:
            return
        if not isinstance(source, str):
            if stored.identity == ANONYMOUS:
                await self._identify_locked(source)
            return
        if stored.identity != identity_of(source):
            await self._identify_locked(source)

    async def identify(self, user_token: AsyncTokenSource) -> LogoutResult:
        """Log in (see ``Client.identify``)."""
        async with self._identity_lock:
            self._reconciled = True
            return await self._identify_locked(user_token)

    async def _identify_locked(self, user_token: AsyncTokenSource) -> LogoutResult:
        token = await self._resolve(user_token)
        target = identity_of(token)
        current = self._core.session.identity if self._core.session else ANONYMOUS
        if current == target and self._core.session is not None:
            self._set_token_source(user_token)
            return LogoutResult(discarded=0)
        await self._flush_quietly()
        discarded = 0
        # From anonymous, queued items stay as they are (frozen bodies, attachment ids,
        # upload state): the server's merge moves the anonymous user's uploads and
        # idempotency keys to the identified user, so a resend replays. From another
        # identified user, this is that user's logout.
        if current != ANONYMOUS:
            discarded = self._forget_user()
        self._set_token_source(user_token)
        async with self._session_lock:
            response = await self._call(self._core.session_spec(token))
            self._core.save_session(response, target)
        return LogoutResult(discarded=discarded)

    def _forget_user(self) -> int:
        return forget_user(self._core, self.outbox._store)

    async def logout(self, *, flush_timeout: float = FLUSH_TIMEOUT) -> LogoutResult:
        """Forget the user (see ``Client.logout``)."""
        async with self._identity_lock:
            self._reconciled = True
            if self._core.session is not None:
                await self._flush_quietly(flush_timeout)
            discarded = self._forget_user()
            self._set_token_source(None)
            async with self._session_lock:
                self._core.forget_session()
                # Offline, or the server asks for a pause: the next call starts the
                # anonymous session; the user is logged out locally either way.
                with contextlib.suppress(APIError), outbox_calls(time.monotonic() + flush_timeout):
                    await self._start_session()
            return LogoutResult(discarded=discarded)

    def _set_token_source(self, source: AsyncTokenSource | None) -> None:
        self._token_source = source
        self._core.store.set("user_token", source if isinstance(source, str) else None)

    async def _flush_quietly(self, seconds: float = FLUSH_TIMEOUT) -> None:
        """Send what can be sent before the user changes; never waits past ``seconds``."""
        with contextlib.suppress(APIError):
            await self.outbox._flush(time.monotonic() + seconds)


class AsyncClient(AsyncClientBase):
    """``conversations.create`` / ``messages.create`` send at once unless ``queue=True``."""

    conversations: AsyncConversations
    messages: AsyncMessages

    def _init_create_resources(self) -> None:
        self.conversations = AsyncConversations(self)
        self.messages = AsyncMessages(self)


class AsyncMobileClient(AsyncClientBase):
    """Feedback goes through the offline outbox unless ``queue=False``."""

    conversations: AsyncQueueingConversations
    messages: AsyncQueueingMessages

    def _init_create_resources(self) -> None:
        self.conversations = AsyncQueueingConversations(self)
        self.messages = AsyncQueueingMessages(self)
