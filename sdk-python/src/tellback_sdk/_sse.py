"""What the sync and async event streams share: the SSE line parser and the resume
bookkeeping (max id seen, recent ids for de-duplication, persistence, backoff).

Only the I/O differs between ``EventStream`` and ``AsyncEventStream``; every decision
is made here, without I/O, so it is tested once.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from tellback_sdk._core import ClientCore, RequestSpec
from tellback_sdk._retry import RetryPolicy, is_retryable_status, parse_retry_after
from tellback_sdk.events import LiveEvent, Reset, ResetData, parse_event

PATH = "/v1/client/events"
DEFAULT_RETRY_S = 2.0  # the server's own default; its ``retry:`` field replaces it
READ_TIMEOUT_S = 45.0  # the server pings at least every 20 s: silence past this is death
RECENT_IDS = 256  # ids remembered for de-duplication (memory and data_dir)
KEY_PREFIX = "events:"


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None


class SSEDecoder:
    """The text/event-stream grammar, one line (without its terminator) at a time."""

    def __init__(self) -> None:
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the heartbeat, or ": connected"
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event, id_ = self._data, self._event, self._id
        self._data, self._event, self._id = [], "", None
        if not data:
            # An id-only block: the server's resume point for a fresh stream.
            return ServerSentEvent("", "", id_) if id_ else None
        return ServerSentEvent(event or "message", "\n".join(data), id_)


def _numeric(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    return int(value)


class StreamState:
    """Resume position and de-duplication of one ``events.stream()``.

    The resume id only moves forward (the max id seen), while de-duplication is by a
    bounded set of recent ids: on PostgreSQL a resume may resend events at or below it.
    Both are saved in ``data_dir`` per user, so an app restart resumes where it was.
    """

    def __init__(
        self,
        core: ClientCore,
        last_event_id: str | None,
        *,
        reconnect: bool,
        read_timeout: float,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.core = core
        self.reconnect = reconnect
        self.read_timeout = read_timeout
        self.uniform = uniform
        self.explicit = last_event_id is not None
        self.last_id: int | None = _numeric(last_event_id)
        if last_event_id is not None and self.last_id is None:
            raise ValueError("last_event_id must be the decimal id of an event")
        self.recent: deque[int] = deque(maxlen=RECENT_IDS)
        self.seen: set[int] = set()
        self.key: str | None = None
        self.decoder = SSEDecoder()
        self.retry_s = DEFAULT_RETRY_S
        self.failures = 0
        self.opened = 0  # connections that got a 200
        self.renewed = False  # one session renewal per failed connect
        self.pending: deque[LiveEvent] = deque()

    # ----- the connection -----------------------------------------------------------------

    def bind(self, user_id: str) -> None:
        """Before each connect: the session's user decides where the position lives."""
        key = f"{KEY_PREFIX}{self.core.base_url}:{self.core.app_key}:{user_id}"
        if key == self.key:
            return
        switched = self.key is not None
        self.key = key
        if switched:  # identify()/logout() while streaming: another user's stream now
            self.last_id, self.explicit = None, False
            self.recent.clear()
            self.seen.clear()
            self.pending.append(Reset(data=ResetData(reason="user_changed")))
        if self.explicit:
            return
        saved = self.core.store.get(key)
        if isinstance(saved, dict) and isinstance(saved.get("last"), int):
            self.last_id = saved["last"]
            for i in saved.get("recent") or []:
                if isinstance(i, int):
                    self._remember(i)

    def request(self) -> RequestSpec:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        return RequestSpec("GET", PATH, headers=headers)

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(10.0, read=self.read_timeout)

    def on_open(self) -> None:
        """A 200: the stream is live. A reconnect with no resume point may have missed
        events (none had arrived to give an id), so the app is told to reload."""
        told = any(isinstance(e, Reset) for e in self.pending)
        if self.opened and self.last_id is None and not told:
            self.pending.append(Reset(data=ResetData(reason="no_resume_point")))
        self.opened += 1
        self.failures = 0
        self.renewed = False
        self.decoder = SSEDecoder()

    def on_401(self) -> bool:
        """True: renew the session and connect again; False: the renewal did not help."""
        if self.renewed:
            return False
        self.renewed = True
        return True

    def delay(self, status: int | None, headers: Mapping[str, str], policy: RetryPolicy) -> float:
        """Seconds before the next connect: the server's ``retry:`` doubled per failure in a
        row, jittered, capped by the client's retry policy; a 429/503's Retry-After wins."""
        self.failures += 1
        if status is not None:
            retry_after = parse_retry_after(headers)
            if retry_after is not None:
                if policy.max_retry_after is not None:
                    return min(retry_after, policy.max_retry_after)
                return retry_after
        base = min(policy.cap, self.retry_s * 2 ** min(self.failures - 1, 16))
        return float(base * self.uniform(0.75, 1.25))

    @staticmethod
    def retryable(status: int | None) -> bool:
        return is_retryable_status(status)

    # ----- the events -----------------------------------------------------------------------

    def feed(self, line: str) -> LiveEvent | None:
        """One line of the stream; an event to hand over, or None."""
        sse = self.decoder.feed(line)
        if self.decoder.retry_ms is not None:
            self.retry_s = self.decoder.retry_ms / 1000
        if sse is None:
            return None
        if not sse.data:
            start = _numeric(sse.id)
            if start is not None and (self.last_id is None or start > self.last_id):
                self.last_id = start
                self._save()
            return None
        try:
            event = parse_event(sse.data, event=sse.event, id=sse.id)
        except ValueError:
            return None  # not an event of this protocol: skip, like a comment
        if isinstance(event, Reset):
            # The old position is useless (unknown, or too far behind): the reset's id is
            # the new one (a server before it had none: live from here). It replaces the
            # saved one even if lower (a database restored from a backup has lower ids).
            self.last_id = _numeric(sse.id)
            self.recent.clear()
            self.seen.clear()
            if self.key is not None:
                self.core.store.set(self.key, None)
            self._save()
            return event
        number = _numeric(sse.id or event.id)
        if number is None:
            return event
        if number in self.seen:
            return None  # a resend after a resume
        self._remember(number)
        if self.last_id is None or number > self.last_id:
            self.last_id = number
        self._save()
        return event

    def _remember(self, number: int) -> None:
        if len(self.recent) == self.recent.maxlen:
            self.seen.discard(self.recent[0])
        self.recent.append(number)
        self.seen.add(number)

    def _save(self) -> None:
        if self.key is None:
            return
        if self.last_id is None:
            self.core.store.set(self.key, None)
            return
        # Another stream of this user (or an explicit older last_event_id) must not move
        # the saved position backwards.
        saved = self.core.store.get(self.key)
        last = self.last_id
        if isinstance(saved, dict) and isinstance(saved.get("last"), int):
            last = max(last, saved["last"])
        self.core.store.set(self.key, {"last": last, "recent": list(self.recent)})


def forget_positions(core: ClientCore) -> None:
    """Logout / another user: no saved stream position may outlive its user."""
    core.store.delete_prefix(KEY_PREFIX)
