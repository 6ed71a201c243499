"""uvicorn, adapted to long-lived streams and process managers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

REPEAT_WINDOW_S = 1.0


class Server(uvicorn.Server):
    """uvicorn's server that ends live streams first when it stops.

    uvicorn waits for open connections before it runs the app's shutdown, and
    an SSE stream never ends by itself: ``on_stop`` (the events broker's
    ``close``) ends every stream cleanly, so a stop takes milliseconds, not the
    graceful-shutdown timeout. Without uvicorn's re-raise of SIGTERM, a
    graceful stop exits with status 0, as process managers expect; a second
    signal forces the exit, unless it came within ``REPEAT_WINDOW_S`` of the
    first: that is the same stop delivered twice (``uv run`` forwards the
    SIGTERM or SIGINT that a process manager or a terminal also sends to the
    whole process group), and forcing would cut the requests in flight.
    """

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_stop = on_stop
        self._first_request = 0.0

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def request_exit(self) -> None:
        now = time.monotonic()
        if not self.should_exit:
            self._first_request = now
        elif now - self._first_request >= REPEAT_WINDOW_S:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        if self._on_stop is not None:
            self._on_stop()
        await super().shutdown(sockets)
