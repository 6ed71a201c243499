"""uvicorn, adapted to long-lived streams and process managers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn


class Server(uvicorn.Server):
    """uvicorn's server that ends live streams first when it stops.

    uvicorn waits for open connections before it runs the app's shutdown, and
    an SSE stream never ends by itself: ``on_stop`` (the events broker's
    ``close``) ends every stream cleanly, so a stop takes milliseconds, not the
    graceful-shutdown timeout. Without uvicorn's re-raise of SIGTERM, a
    graceful stop exits with status 0, as process managers expect; a second
    signal forces the exit.
    """

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def request_exit(self) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        if self._on_stop is not None:
            self._on_stop()
        await super().shutdown(sockets)
