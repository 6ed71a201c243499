"""Live events: ``client.events.stream()`` over ``GET /v1/client/events`` (SSE).

The stream reconnects by itself (the server's ``retry:`` as the base delay, doubled
per failure in a row, jittered, capped by the client's retry policy), resumes with
``Last-Event-ID`` = the highest id seen, drops events it has already handed over,
renews the session once on a 401, and treats 45 s without a byte as a dead
connection (the server pings at least every 20 s). The resume position is kept in
``data_dir`` per user, so an app restart carries on where it stopped; ``logout()``
forgets it.

Start the stream *before* loading what the app shows: then nothing that happens in
between is lost. ``connect()`` opens it without waiting for an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import httpx

from tellback_sdk._sse import READ_TIMEOUT_S, StreamState
from tellback_sdk.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    make_status_error,
)
from tellback_sdk.events import LiveEvent
from tellback_sdk.resources._base import AsyncAPIResource, SyncAPIResource

if TYPE_CHECKING:
    from tellback_sdk._async_client import AsyncClientBase
    from tellback_sdk._client import SyncClientBase

__all__ = ["AsyncEventStream", "AsyncEvents", "EventStream", "Events"]


def _shutdown(response: httpx.Response | None) -> None:
    """Wake a reader blocked on this response's socket (from another thread or task):
    it sees the end of the stream. Closing the socket alone would not wake it."""
    if response is None:
        return
    stream: Any = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _session_failure(
    state: StreamState, exc: APIError
) -> tuple[APIError, int | None, httpx.Headers]:
    """A session that could not be made or renewed: offline, or the server down (a 503
    in an outage), is waited out like a failed connect; a final answer is raised. A
    renewal that failed so did not "not help": the next 401 may renew again."""
    if isinstance(exc, APIStatusError) and not state.retryable(exc.status_code):
        raise exc
    state.renewed = False
    if isinstance(exc, APIStatusError):
        return exc, exc.status_code, exc.response.headers
    return exc, None, httpx.Headers()


def _transport_error(exc: httpx.TransportError) -> APIConnectionError:
    error = (
        APITimeoutError()
        if isinstance(exc, httpx.TimeoutException)
        else APIConnectionError(f"{type(exc).__name__}: {exc}")
    )
    error.__cause__ = exc
    return error


class EventStream:
    """An iterator of ``LiveEvent`` that keeps itself connected. ``close()`` (or leaving
    ``with``, breaking out of a ``for`` over it, or closing the client) ends it."""

    def __init__(
        self,
        client: SyncClientBase,
        last_event_id: str | None,
        *,
        reconnect: bool,
        read_timeout: float,
    ) -> None:
        self._client = client
        self._state = StreamState(
            client._core, last_event_id, reconnect=reconnect, read_timeout=read_timeout
        )
        self._response: httpx.Response | None = None
        self._lines: Iterator[str] | None = None
        self._closed = False
        self._wake = threading.Event()
        self._busy = False  # a thread is inside __next__
        client._streams.add(self)

    @property
    def last_event_id(self) -> str | None:
        """The resume position: the highest event id handed over so far."""
        last = self._state.last_id
        return None if last is None else str(last)

    @property
    def connected(self) -> bool:
        return self._response is not None

    def connect(self) -> None:
        """Open the stream now (iterating does it otherwise): events from here on are
        not missed even if none is read yet."""
        if self._lines is None and not self._closed:
            self._open()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> LiveEvent:
        self._busy = True
        try:
            return self._next()
        except BaseException:
            self._closed = True  # the end (StopIteration) or an error: let the socket go
            self._drop()
            raise
        finally:
            self._busy = False

    def __del__(self) -> None:
        # A ``break`` out of ``for event in client.events.stream()`` lands here at once
        # (no reference cycle): the connection is closed, not leaked.
        with contextlib.suppress(Exception):
            self._drop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop: safe from any thread, also while another thread waits for an event."""
        self._closed = True
        self._wake.set()
        if self._busy:
            _shutdown(self._response)  # the reading thread ends and cleans up
            return
        self._drop()

    # ----- internals ------------------------------------------------------------------------

    def _next(self) -> LiveEvent:
        state = self._state
        policy = self._client._core.policy
        while True:
            if self._closed:
                raise StopIteration
            if state.pending:
                return state.pending.popleft()
            if self._lines is None:
                self._open()
                continue
            try:
                line = next(self._lines)
            except StopIteration:  # the server ended the stream
                self._drop()
                if self._closed or not state.reconnect:
                    raise
                self._sleep(state.delay(None, {}, policy))
                continue
            except httpx.TransportError as exc:
                self._drop()
                if self._closed:
                    raise StopIteration from None
                if not state.reconnect:
                    raise _transport_error(exc) from exc
                self._sleep(state.delay(None, {}, policy))
                continue
            event = state.feed(line)
            if event is not None:
                return event

    def _open(self) -> None:
        state, client = self._state, self._client
        policy = client._core.policy
        while not self._closed:
            status: int | None = None
            headers: httpx.Headers = httpx.Headers()
            error: APIError
            try:
                session = client._ensure_session()
                state.bind(session.user_id)
                response = self._send(session.token)
            except APIError as exc:  # no session: offline, or the server is down
                error, status, headers = _session_failure(state, exc)
            except httpx.TransportError as exc:
                error = _transport_error(exc)
            else:
                if response.status_code == 200:
                    self._response, self._lines = response, response.iter_lines()
                    state.on_open()
                    return
                response.read()
                response.close()
                error = make_status_error(response)
                status, headers = response.status_code, response.headers
                if status == 401 and state.on_401():
                    try:
                        client._renew_session(session.token)
                    except APIError as exc:
                        error, status, headers = _session_failure(state, exc)
                    else:
                        continue
                elif not state.retryable(status):
                    raise error
            if not state.reconnect and state.failures >= policy.max_retries:
                raise error
            self._sleep(state.delay(status, headers, policy))

    def _send(self, token: str) -> httpx.Response:
        core, http = self._client._core, self._client._http
        spec = self._state.request()
        request = http.build_request(
            "GET",
            core.base_url + spec.path,
            headers=core.headers(spec, token),
            timeout=self._state.timeout(),
        )
        return http.send(request, stream=True)

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)

    def _drop(self) -> None:
        if self._closed:
            self._client._streams.discard(self)
        response, self._response, self._lines = self._response, None, None
        if response is not None:
            with contextlib.suppress(httpx.HTTPError, OSError, RuntimeError):
                response.close()


class AsyncEventStream:
    """The asyncio twin of ``EventStream``: ``async for event in stream``."""

    def __init__(
        self,
        client: AsyncClientBase,
        last_event_id: str | None,
        *,
        reconnect: bool,
        read_timeout: float,
    ) -> None:
        self._client = client
        self._state = StreamState(
            client._core, last_event_id, reconnect=reconnect, read_timeout=read_timeout
        )
        self._response: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._closed = False
        self._wake_: asyncio.Event | None = None
        self._busy = False  # a task is inside __anext__
        client._streams.add(self)

    @property
    def _wake(self) -> asyncio.Event:
        if self._wake_ is None:
            self._wake_ = asyncio.Event()
        return self._wake_

    @property
    def last_event_id(self) -> str | None:
        last = self._state.last_id
        return None if last is None else str(last)

    @property
    def connected(self) -> bool:
        return self._response is not None

    async def connect(self) -> None:
        """Open the stream now (see ``EventStream.connect``)."""
        if self._lines is None and not self._closed:
            await self._open()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> LiveEvent:
        self._busy = True
        try:
            return await self._next()
        except BaseException:
            self._closed = True  # the end, an error or a cancellation: let the socket go
            await self._drop()
            raise
        finally:
            self._busy = False

    def __del__(self) -> None:
        # Dropped without ``aclose()`` (a ``break`` out of ``async for``): end the
        # connection now; the response itself is closed on the loop if one runs.
        response = self._response
        if response is None:
            return
        _shutdown(response)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().create_task(response.aclose())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: also from another task while one waits for an event."""
        self._closed = True
        self._wake.set()
        if self._busy:
            _shutdown(self._response)  # the reading task ends and cleans up
            return
        await self._drop()

    # ----- internals ------------------------------------------------------------------------

    async def _next(self) -> LiveEvent:
        state = self._state
        policy = self._client._core.policy
        while True:
            if self._closed:
                raise StopAsyncIteration
            if state.pending:
                return state.pending.popleft()
            if self._lines is None:
                await self._open()
                continue
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:
                await self._drop()
                if self._closed or not state.reconnect:
                    raise
                await self._sleep(state.delay(None, {}, policy))
                continue
            except httpx.TransportError as exc:
                await self._drop()
                if self._closed:
                    raise StopAsyncIteration from None
                if not state.reconnect:
                    raise _transport_error(exc) from exc
                await self._sleep(state.delay(None, {}, policy))
                continue
            event = state.feed(line)
            if event is not None:
                return event

    async def _open(self) -> None:
        state, client = self._state, self._client
        policy = client._core.policy
        while not self._closed:
            status: int | None = None
            headers: httpx.Headers = httpx.Headers()
            error: APIError
            try:
                session = await client._ensure_session()
                state.bind(session.user_id)
                response = await self._send(session.token)
            except APIError as exc:  # no session: offline, or the server is down
                error, status, headers = _session_failure(state, exc)
            except httpx.TransportError as exc:
                error = _transport_error(exc)
            else:
                if response.status_code == 200:
                    self._response = response
                    self._lines = response.aiter_lines()
                    state.on_open()
                    return
                await response.aread()
                await response.aclose()
                error = make_status_error(response)
                status, headers = response.status_code, response.headers
                if status == 401 and state.on_401():
                    try:
                        await client._renew_session(session.token)
                    except APIError as exc:
                        error, status, headers = _session_failure(state, exc)
                    else:
                        continue
                elif not state.retryable(status):
                    raise error
            if not state.reconnect and state.failures >= policy.max_retries:
                raise error
            await self._sleep(state.delay(status, headers, policy))

    async def _send(self, token: str) -> httpx.Response:
        core, http = self._client._core, self._client._http
        spec = self._state.request()
        request = http.build_request(
            "GET",
            core.base_url + spec.path,
            headers=core.headers(spec, token),
            timeout=self._state.timeout(),
        )
        return await http.send(request, stream=True)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _drop(self) -> None:
        if self._closed:
            self._client._streams.discard(self)
        response, self._response, lines, self._lines = self._response, None, self._lines, None
        closer = getattr(lines, "aclose", None)
        if closer is not None:
            with contextlib.suppress(httpx.HTTPError, OSError, RuntimeError):
                await closer()
        if response is not None:
            with contextlib.suppress(httpx.HTTPError, OSError, RuntimeError):
                await response.aclose()


class Events(SyncAPIResource):
    def stream(
        self,
        last_event_id: str | None = None,
        *,
        reconnect: bool = True,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> EventStream:
        """Live events for this user, until closed.

        ``last_event_id``: resume after this id (default: the position saved in
        ``data_dir`` for this user, or live from now). ``reconnect=False``: end when the
        connection ends (raising ``APIConnectionError`` if it broke) instead of
        reconnecting; the first connect still retries per the client's retry policy.
        """
        return EventStream(
            self._client, last_event_id, reconnect=reconnect, read_timeout=read_timeout
        )


class AsyncEvents(AsyncAPIResource):
    def stream(
        self,
        last_event_id: str | None = None,
        *,
        reconnect: bool = True,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> AsyncEventStream:
        """Live events for this user (see ``Events.stream``): ``async for event in ...``."""
        return AsyncEventStream(
            self._client, last_event_id, reconnect=reconnect, read_timeout=read_timeout
        )
