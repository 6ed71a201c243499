"""Trivial job handlers for the outbox tests, loadable by ``tellback worker --plugin``.

Every handler that leaves a trace appends one short line to the file named in its
payload (``O_APPEND`` writes of a few bytes are atomic, so concurrent workers in
several processes can share one file).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from tellback_server.jobs.registry import JobContext, JobRegistry, PermanentFailure, RetryLater

SLOW_FIRST_TIMEOUT_S = 300.0


def append_line(path: str | Path, line: str) -> None:
    with Path(path).open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def read_lines(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.exists():
        return []
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line]


async def _append(path: str, line: str) -> None:
    await asyncio.to_thread(append_line, path, line)


async def append(_ctx: JobContext, payload: dict[str, Any]) -> None:
    """``{"path", "line"}``: append ``line`` to ``path``."""
    await _append(payload["path"], payload["line"])


async def record(ctx: JobContext, payload: dict[str, Any]) -> None:
    """``{"path", "sleep"?}``: sleep a little, then record ``<job id> <pid> <attempt>``."""
    await asyncio.sleep(float(payload.get("sleep", 0.0)))
    await _append(payload["path"], f"{ctx.job_id} {os.getpid()} {ctx.attempt}")


async def slow_first(ctx: JobContext, payload: dict[str, Any]) -> None:
    """``{"path", "seconds"}``: on the first attempt, hang for ``seconds`` (a job that outlives
    its worker); on a later attempt, finish at once."""
    await _append(payload["path"], f"start {ctx.job_id} {os.getpid()} {ctx.attempt}")
    if ctx.attempt == 1:
        await asyncio.sleep(float(payload["seconds"]))
    await _append(payload["path"], f"done {ctx.job_id} {os.getpid()} {ctx.attempt}")


async def retry_later(_ctx: JobContext, payload: dict[str, Any]) -> None:
    """``{"delay"}``: ask to be retried no sooner than ``delay`` seconds (a Retry-After)."""
    raise RetryLater("rate limited by the provider", delay=float(payload["delay"]))


async def permanent(_ctx: JobContext, payload: dict[str, Any]) -> None:
    raise PermanentFailure(str(payload.get("reason", "this can never succeed")))


def register(registry: JobRegistry) -> None:
    """The ``--plugin tests.server.job_plugins:register`` entry point."""
    registry.register("test.append", append)
    registry.register("test.record", record)
    registry.register("test.slow_first", slow_first, timeout_s=SLOW_FIRST_TIMEOUT_S)
    registry.register("test.retry_later", retry_later, base_delay_s=1.0)
    registry.register("test.permanent", permanent)
