"""Loading job-handler plugins named ``module:function`` (CLI ``--plugin``)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from tellback_server.domain.attachments.media import register as register_media
from tellback_server.domain.events.retention import register as register_events
from tellback_server.domain.identity.retention import register as register_sessions
from tellback_server.domain.push.delivery import register as register_push
from tellback_server.domain.webhooks.delivery import register as register_webhooks
from tellback_server.jobs.registry import JobRegistry
from tellback_server.settings import SettingsError


def build_registry(plugins: Iterable[str] = ()) -> JobRegistry:
    """The registry of every job kind this process can run: built-ins, then plugins."""
    registry = JobRegistry()
    register_media(registry)
    register_push(registry)
    register_webhooks(registry)
    register_events(registry)
    register_sessions(registry)
    for spec in plugins:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise SettingsError(f"--plugin: expected module:function, got {spec!r}")
        try:
            func = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SettingsError(f"--plugin: cannot load {spec!r}: {exc}") from None
        func(registry)
    return registry
