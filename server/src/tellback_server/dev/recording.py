"""What both provider fakes share: the record of requests, injected failures, waiting."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar


class FailureRule(Protocol):
    remaining: int | None  # None: until clear_failures()
    token: str | None  # None: any token


log = logging.getLogger("tellback.dev")

R = TypeVar("R")
F = TypeVar("F", bound=FailureRule)


@dataclass(slots=True)
class _Waiter:
    count: int
    attempts: bool
    future: asyncio.Future[None]


class Recorder(Generic[R, F]):
    """Keeps :attr:`received` (accepted) and :attr:`attempts` (every request), a queue of
    injected failures, and lets a test wait for counts of either."""

    label: ClassVar[str] = "fake"
    accepted_noun: ClassVar[str] = "accepted requests"
    attempt_noun: ClassVar[str] = "requests"

    max_records: int | None
    on_request: Callable[[R], None] | None
    received: list[R]
    attempts: list[R]
    received_count: int
    attempt_count: int
    _failures: list[F]
    _waiters: list[_Waiter]

    def _init_recorder(self) -> None:
        self.received = []
        self.attempts = []
        self.received_count = 0
        self.attempt_count = 0
        self._failures = []
        self._waiters = []

    def _record(self, record: R, accepted: bool) -> None:
        """Keep one answered request (trimmed to ``max_records``), wake waiters, call back."""
        self.attempts.append(record)
        self.attempt_count += 1
        if accepted:
            self.received.append(record)
            self.received_count += 1
        if self.max_records is not None:
            for records in (self.attempts, self.received):
                if len(records) > self.max_records * 2:
                    del records[: len(records) - self.max_records]
        if self._waiters:
            self._wake()
        if self.on_request is not None:
            try:
                self.on_request(record)
            except Exception:
                log.exception("%s on_request callback failed", self.label)

    def _describe(self, record: R) -> str:
        """A short "status reason" of an answered request, for timeout messages."""
        raise NotImplementedError

    def clear_failures(self) -> None:
        self._failures.clear()

    def _reset_records(self) -> None:
        self.received.clear()
        self.attempts.clear()
        self.received_count = 0
        self.attempt_count = 0
        self._failures.clear()

    def _add_failure(self, failure: F) -> None:
        if failure.remaining is not None and failure.remaining < 1:
            raise ValueError("count must be >= 1 (or None for 'until cleared')")
        self._failures.append(failure)

    def _take_failure(self, token: str | None) -> F | None:
        for index, failure in enumerate(self._failures):
            if failure.token is not None and failure.token != token:
                continue
            if failure.remaining is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    del self._failures[index]
            return failure
        return None

    async def wait_for(
        self,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109 (part of the fakes' API)
    ) -> list[R]:
        """Wait until ``count`` requests were accepted in total; returns :attr:`received`."""
        await self._wait(count, timeout, attempts=False)
        return self.received

    async def wait_for_attempts(
        self,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[R]:
        """Wait until ``count`` requests (accepted or not) arrived; returns :attr:`attempts`."""
        await self._wait(count, timeout, attempts=True)
        return self.attempts

    async def _wait(self, count: int, timeout: float, *, attempts: bool) -> None:  # noqa: ASYNC109
        current = self.attempt_count if attempts else self.received_count
        if current >= count:
            return
        waiter = _Waiter(count, attempts, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except TimeoutError:
            what = self.attempt_noun if attempts else self.accepted_noun
            got = self.attempt_count if attempts else self.received_count
            last = [self._describe(a) for a in self.attempts[-3:]]
            message = f"{self.label}: waited {timeout}s for {count} {what}, got {got}"
            raise TimeoutError(f"{message} (last answers: {last})") from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        for waiter in self._waiters:
            current = self.attempt_count if waiter.attempts else self.received_count
            if current >= waiter.count and not waiter.future.done():
                waiter.future.set_result(None)

    def _cancel_waiters(self) -> None:
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.cancel()
        self._waiters.clear()
