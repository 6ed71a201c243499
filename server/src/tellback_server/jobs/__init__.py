"""The transactional outbox: enqueue in the caller's transaction, run in workers."""

from tellback_server.jobs.queue import enqueue
from tellback_server.jobs.registry import JobContext, JobRegistry, RetryLater

__all__ = ["JobContext", "JobRegistry", "RetryLater", "enqueue"]
