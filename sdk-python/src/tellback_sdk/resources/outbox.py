"""The offline outbox: queued feedback sent in order once the network is back.

``flush()`` sends pending items oldest first. A connection error, any 5xx, a
redirect, 401, 407, 408, 429 or an in-progress idempotency key stops the flush and
keeps the item for later (a ``Retry-After`` stops it at once, never slept inside
it); any other 4xx moves it to the dead letters, which the app shows
(``dead_letters()``) and the user retries or discards.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from tellback_sdk._core import RequestSpec, outbox_calls
from tellback_sdk._outbox_store import AttachmentFile, OutboxFailure, OutboxStore, QueuedItem
from tellback_sdk._retry import backoff_delay, is_retryable_status, parse_retry_after
from tellback_sdk.errors import (
    APIConnectionError,
    APIStatusError,
    AttachmentLimitError,
    IdentityRequiredError,
    TellbackError,
    UnprocessableEntityError,
)
from tellback_sdk.resources._base import AsyncAPIResource, SyncAPIResource

if TYPE_CHECKING:
    from tellback_sdk._async_client import AsyncClientBase
    from tellback_sdk._client import SyncClientBase

log = logging.getLogger("tellback_sdk.outbox")

# Idle wait of the background flusher between checks when nothing wakes it.
IDLE_RECHECK = 300.0


class _Created(msgspec.Struct):
    id: str


@dataclass(frozen=True, slots=True)
class FlushResult:
    sent: int
    dead: int
    pending: int
    stopped_by: TellbackError | None = None  # why the flush stopped early (keep for later)

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked to wait before the next flush (its ``Retry-After``,
        or what is left of it when this flush did not start because of it)."""
        err = self.stopped_by
        if isinstance(err, _Paused):
            return err.retry_after
        if not isinstance(err, APIStatusError):
            return None
        return parse_retry_after(err.response.headers)


class _Paused(TellbackError):
    """The server asked for a pause (``Retry-After``) that has not passed yet."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the server asked to wait; {retry_after:.0f} s left")
        self.retry_after = retry_after


# Wall-clock time before which no flush sends: a server's Retry-After, kept in data_dir
# so that neither another flush() nor a restart ignores it.
PAUSED_UNTIL = "outbox_paused_until"


class _Dependency(Exception):
    """A message whose queued conversation could not be sent."""


class _Unreadable(TellbackError):
    """A row this SDK cannot read: sent never, blocking nothing."""


class _Blocked(TellbackError):
    """A message whose queued conversation is still waiting: try again later."""


# 4xx answers that say "not now" rather than "never": a session to renew, a proxy
# wanting credentials (a captive portal), a timeout, a rate limit.
_KEEP_4XX = frozenset({401, 407, 408, 429})


def final_status(status: int, code: str | None) -> bool:
    """Whether an answer dead-letters an outbox item: only a 4xx that refuses this item.
    A 5xx of any number, a redirect (a captive portal's 302) or any other odd status
    is about the network or the server, and every later item would get it too."""
    if not 400 <= status < 500 or status in _KEEP_4XX:
        return False
    return not is_retryable_status(status, code)  # 409 idempotency_key_in_progress


# Errors of the process, not of one item's files: trying again later may work.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.ENOSPC}
)


def failure_of(exc: BaseException) -> tuple[OutboxFailure, bool]:
    """How an error is recorded, and whether it is final (dead letter) or transient."""
    if isinstance(exc, APIStatusError):
        final = final_status(exc.status_code, exc.code)
        return OutboxFailure(exc.status_code, exc.code, exc.detail or exc.message), final
    if isinstance(exc, APIConnectionError | IdentityRequiredError):
        return OutboxFailure(None, None, str(exc)), False
    if isinstance(exc, AttachmentLimitError | _Dependency | _Unreadable):
        return OutboxFailure(None, "local", str(exc)), True
    if isinstance(exc, OSError):
        # The only files a delivery reads are the item's own copies: one that is gone,
        # unreadable or not a file any more will not get better by itself.
        final = exc.errno not in _TRANSIENT_ERRNOS
        return OutboxFailure(None, "local", f"{type(exc).__name__}: {exc}"), final
    return OutboxFailure(None, None, f"{type(exc).__name__}: {exc}"), False


def server_failed_on_it(exc: BaseException) -> bool:
    """The server itself (a problem document with a code) failed on this item, and not
    for being overloaded or down: what a request that crashes it looks like."""
    if not isinstance(exc, APIStatusError) or exc.status_code < 500 or exc.code is None:
        return False
    return exc.status_code != 503 and parse_retry_after(exc.response.headers) is None


_EXPECTED = (TellbackError, _Dependency, OSError)
_ATTACHMENT_FIELD = re.compile(r"attachment_ids\[(\d+)\]")


class _OutboxBase:
    _store: OutboxStore
    _owner: str
    _give_up: tuple[int, float]  # (failures, seconds): RetryPolicy.outbox_give_up_*
    _pause_cap: float | None  # RetryPolicy.outbox_max_retry_after

    def pending(self) -> list[QueuedItem]:
        return self._store.items(self._owner, "pending")

    def dead_letters(self) -> list[QueuedItem]:
        return self._store.items(self._owner, "dead")

    def get(self, item_id: str) -> QueuedItem | None:
        return self._store.get(item_id)

    def discard(self, item_id: str) -> bool:
        """Drop a pending or dead item for good (e.g. the user deleted the draft)."""
        return self._store.discard(item_id)

    def _upload_again(self, row: sqlite3.Row, exc: UnprocessableEntityError) -> sqlite3.Row:
        """The item's row to send again when ``exc`` says one of its own uploads is gone
        from the server (expired unattached, or unknown): that file goes up again, once.
        Otherwise ``exc`` stands (the item is dead, as any 422 makes it)."""
        own = len(json.loads(row["request"]).get("attachment_ids") or [])
        gone = [
            int(m.group(1)) - own
            for e in exc.errors
            if (m := _ATTACHMENT_FIELD.fullmatch(e.field)) is not None
            and int(m.group(1)) >= own
            and ("expired" in e.message or "unknown attachment id" in e.message)
        ]
        fresh = self._store.fresh(row["id"]) if self._store.upload_again(row["id"], gone) else None
        if fresh is None:
            raise exc
        log.info("upload of outbox item %s gone from the server: sending it again", row["id"])
        return fresh

    def _finish(self, row: sqlite3.Row, response_content: bytes) -> None:
        created = msgspec.json.decode(response_content, type=_Created)
        self._store.mark_sent(row["id"], created.id)

    def _path(self, row: sqlite3.Row) -> str | None:
        problem = self._store.unreadable(row)
        if problem is not None:
            raise _Unreadable(problem)
        resolved = self._store.resolve(row)
        if resolved.dead_reason is not None:
            raise _Dependency(resolved.dead_reason)
        return resolved.path

    def _paused(self) -> FlushResult | None:
        until = self._store.store.get(PAUSED_UNTIL)
        left = until - time.time() if isinstance(until, int | float) else 0.0
        if left <= 0:
            return None
        return FlushResult(0, 0, len(self.pending()), _Paused(left))

    def _remember_pause(self, result: FlushResult) -> FlushResult:
        wait = result.retry_after
        if wait is not None and wait > 0 and isinstance(result.stopped_by, APIStatusError):
            if self._pause_cap is not None:  # RetryPolicy.outbox_max_retry_after
                wait = min(wait, self._pause_cap)
            self._store.store.set(PAUSED_UNTIL, time.time() + wait)
        return result

    def _stopped(self, owner: str, sent: int, dead: int, why: BaseException) -> FlushResult:
        """The answer of a flush that stops early, ``why`` as its reason."""
        pending = len(self._store.items(owner, "pending"))
        err = why if isinstance(why, TellbackError) else TellbackError(str(why))
        return FlushResult(sent, dead, pending, err)

    def _record(self, row: sqlite3.Row, exc: BaseException) -> str:
        """Store the failure: "stop" the flush (transient), "dead", or "gone" (the item
        was sent or discarded meanwhile, by another client on this data directory)."""
        failure, final = failure_of(exc)
        state = self._store.note_failure(
            row["id"],
            failure,
            dead=final,
            server_failure=server_failed_on_it(exc),
            give_up=self._give_up,
        )
        if state is None:
            return "gone"
        return "dead" if state == "dead" else "stop"


class Outbox(SyncAPIResource, _OutboxBase):
    def __init__(self, client: SyncClientBase) -> None:
        super().__init__(client)
        self._store = OutboxStore(client._core.store)
        policy = client._core.outbox_policy
        self._give_up = (policy.outbox_give_up_failures, policy.outbox_give_up_seconds)
        self._pause_cap = policy.outbox_max_retry_after
        self._lock = threading.Lock()

    @property
    def _owner(self) -> str:  # type: ignore[override]
        return self._core.owner

    def retry(self, item_id: str) -> bool:
        return self._store.retry(item_id)

    def flush(self) -> FlushResult:
        """Send what is queued, in order. Returns counts; never raises for delivery errors.
        Never sleeps on a server's ``Retry-After``: the flush stops and
        ``FlushResult.retry_after`` says when to try again."""
        return self._flush(None)

    def _flush(self, deadline: float | None) -> FlushResult:
        with self._lock:
            paused = self._paused()
            if paused is not None:
                return paused
            with outbox_calls(deadline):
                return self._remember_pause(self._send_all(deadline))

    def _send_all(self, deadline: float | None) -> FlushResult:
        sent = dead = 0
        owner = self._owner
        while (row := self._store.next_pending(owner)) is not None:
            if deadline is not None and time.monotonic() >= deadline:
                return self._stopped(owner, sent, dead, _Blocked("out of time"))
            try:
                self._deliver(row)
            except _EXPECTED as exc:
                outcome = self._record(row, exc)
                if outcome == "stop":
                    return self._stopped(owner, sent, dead, exc)
                dead += outcome == "dead"
                continue
            sent += 1
        return FlushResult(sent, dead, 0)

    def _deliver(self, row: sqlite3.Row) -> None:
        path = self._path(row)
        if path is None:
            raise _Blocked("its conversation is not sent yet")
        while True:
            for index, att in enumerate(self._store.attachments(row)):
                if att["attachment_id"] is None:
                    uploaded = self._client.attachments.upload(
                        att["path"],
                        kind=att["kind"],
                        content_type=att["content_type"],
                        filename=att["filename"],
                    )
                    self._store.set_attachment_id(row["id"], index, uploaded.id)
            body = self._store.wire_body(row["id"])
            self._store.note_attempt(row["id"])
            spec = RequestSpec("POST", path, content=body, idempotency_key=row["idempotency_key"])
            try:
                response = self._client._call(spec, self._core.outbox_policy)
            except UnprocessableEntityError as exc:
                row = self._upload_again(row, exc)
                continue
            self._finish(row, response.content)
            return


class AsyncOutbox(AsyncAPIResource, _OutboxBase):
    def __init__(self, client: AsyncClientBase) -> None:
        super().__init__(client)
        self._store = OutboxStore(client._core.store)
        policy = client._core.outbox_policy
        self._give_up = (policy.outbox_give_up_failures, policy.outbox_give_up_seconds)
        self._pause_cap = policy.outbox_max_retry_after
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def _owner(self) -> str:  # type: ignore[override]
        return self._core.owner

    def retry(self, item_id: str) -> bool:
        ok = self._store.retry(item_id)
        self.wake()
        return ok

    async def _enqueue(
        self,
        owner: str,
        kind: str,
        request: dict[str, Any],
        conversation_ref: str | None,
        files: Sequence[AttachmentFile],
    ) -> QueuedItem:
        """Queue an item; cancelled means not queued. The copies are made in a thread
        that a cancel cannot stop (its copies are removed when it ends); the row is
        written here, with no await between it and the return."""
        if files:
            copying = asyncio.ensure_future(asyncio.to_thread(self._store.copy_files, files))
            try:
                item_id, attachments = await asyncio.shield(copying)
            except asyncio.CancelledError:
                copying.add_done_callback(self._drop_copies)
                raise
        else:
            item_id, attachments = self._store.copy_files(files)
        item = self._store.insert(item_id, owner, kind, request, conversation_ref, attachments)
        self.wake()
        return item

    def _drop_copies(self, copying: asyncio.Future[tuple[str, list[dict[str, Any]]]]) -> None:
        if not copying.cancelled() and copying.exception() is None:
            self._store.drop_files(copying.result()[0])

    async def flush(self) -> FlushResult:
        """See ``Outbox.flush``."""
        return await self._flush(None)

    async def _flush(self, deadline: float | None) -> FlushResult:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            paused = self._paused()
            if paused is not None:
                return paused
            with outbox_calls(deadline):
                return self._remember_pause(await self._send_all(deadline))

    async def _send_all(self, deadline: float | None) -> FlushResult:
        sent = dead = 0
        owner = self._owner
        while (row := self._store.next_pending(owner)) is not None:
            if deadline is not None and time.monotonic() >= deadline:
                return self._stopped(owner, sent, dead, _Blocked("out of time"))
            try:
                await self._deliver(row)
            except _EXPECTED as exc:
                outcome = self._record(row, exc)
                if outcome == "stop":
                    return self._stopped(owner, sent, dead, exc)
                dead += outcome == "dead"
                continue
            sent += 1
        return FlushResult(sent, dead, 0)

    async def _deliver(self, row: sqlite3.Row) -> None:
        path = self._path(row)
        if path is None:
            raise _Blocked("its conversation is not sent yet")
        while True:
            for index, att in enumerate(self._store.attachments(row)):
                if att["attachment_id"] is None:
                    uploaded = await self._client.attachments.upload(
                        att["path"],
                        kind=att["kind"],
                        content_type=att["content_type"],
                        filename=att["filename"],
                    )
                    self._store.set_attachment_id(row["id"], index, uploaded.id)
            body = self._store.wire_body(row["id"])
            self._store.note_attempt(row["id"])
            spec = RequestSpec("POST", path, content=body, idempotency_key=row["idempotency_key"])
            try:
                response = await self._client._call(spec, self._core.outbox_policy)
            except UnprocessableEntityError as exc:
                row = self._upload_again(row, exc)
                continue
            self._finish(row, response.content)
            return

    # ----- background flushing ------------------------------------------------------------

    def start(self) -> None:
        """Flush now and whenever something is queued; back off while offline."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="tellback-outbox")

    def wake(self) -> None:
        """Something was queued: flush soon (starts the background task if enabled)."""
        if self._client.auto_flush and (self._task is None or self._task.done()):
            self.start()
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        assert self._wake is not None
        failures = 0
        while True:
            self._wake.clear()
            try:
                result = await self.flush()
            except Exception as exc:  # the loop must outlive surprises; they are logged
                log.exception("outbox flush failed")
                result = FlushResult(0, 0, 0, TellbackError(str(exc)))
            if result.stopped_by is None:
                failures, delay = 0, IDLE_RECHECK
            else:
                failures += 1
                delay = (
                    result.retry_after
                    if result.retry_after is not None  # Retry-After: 0 means now
                    else backoff_delay(failures, self._core.outbox_policy)
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
