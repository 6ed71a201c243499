"""What every ``tellback`` command shares: its settings, checked, and its event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import click
import structlog

from tellback_server.logging import configure_logging
from tellback_server.settings import (
    Settings,
    SettingsError,
    ensure_data_dir,
    load_settings,
    resolve_secret_key,
    unknown_variables,
)

log = structlog.get_logger("tellback.cli")


def command_settings(need_secret: bool = True, *, check_names: bool = False) -> Settings:
    """The settings, logging configured; a bad value is a one-line error naming it.

    ``need_secret``: the command runs the server or its workers (``serve``, ``worker``),
    which need the secret key (from the data dir when unset) and local storage.
    ``check_names``: warn of ``TELLBACK_*`` variables that no setting reads.
    """
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        configure_logging(settings.log_level, settings.log_format)
        if check_names:
            _warn_about_unknown_variables()
        if _uses_data_dir(settings, need_secret) and not ensure_data_dir(settings.data_dir):
            log.warning(
                "settings.data_dir_not_private",
                path=str(settings.data_dir),
                detail="other users may read the data dir (the database, users' files, the "
                "generated key): make it accessible to Tellback's user only (chmod 700)",
            )
        if need_secret:
            settings, from_file = resolve_secret_key(settings)
            if from_file and not settings.is_embedded_default:
                log.warning(
                    "settings.secret_key_from_data_dir",
                    path=str(settings.data_dir / "secret_key"),
                    hint="set TELLBACK_SECRET_KEY: every node must share one key",
                )
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # the data dir cannot be created or read
        raise click.ClickException(
            f"TELLBACK_DATA_DIR: cannot use {settings.data_dir}: {exc.strerror or exc}"
        ) from None
    return settings


def _uses_data_dir(settings: Settings, serving: bool) -> bool:
    """Whether this command keeps anything in the data dir: the SQLite file, and for
    the server and its workers local storage and the generated key."""
    path = settings.sqlite_path
    if path is not None and settings.data_dir.absolute() in path.absolute().parents:
        return True
    return serving and (settings.s3 is None or settings.secret_key is None)


def _warn_about_unknown_variables() -> None:
    """A misspelled setting is ignored, so the server runs on its default (local disk
    for a misspelled TELLBACK_S3_ENDPOINT): name it, never its value."""
    unknown = unknown_variables()
    if unknown:
        log.warning(
            "settings.unknown_variables",
            detail="these TELLBACK_* variables are not Tellback settings and are ignored",
            names=[f"{name} (did you mean {close}?)" if close else name for name, close in unknown],
        )


def loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a long-running command runs on: uvloop where it is installed.

    ``auto`` is uvicorn's own choice, and the one a bare Litestar app under
    ``uvicorn`` gets: uvloop (part of ``uvicorn[standard]``) when it can be imported,
    else asyncio's. uvloop's sockets cost a fraction of asyncio's selector transports,
    which a request pays for on the HTTP connection and again per database round trip.
    """
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise click.ClickException("--loop uvloop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


LOOP_OPTION = click.option(
    "--loop",
    type=click.Choice(["auto", "uvloop", "asyncio"]),
    default="auto",
    show_default=True,
    help="Event loop: auto picks uvloop when installed.",
)


def run_async(coro_fn: Callable[[], Any], loop: str = "asyncio") -> Any:
    try:
        with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
            return runner.run(coro_fn())
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
