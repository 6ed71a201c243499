"""Tellback Python SDK: the end-user side of in-app feedback.

    from tellback_sdk import Client

    with Client("https://feedback.example.com", "tbk_...", data_dir="~/.myapp") as tb:
        conv = tb.conversations.create("The checkout button does nothing",
                                       attachments=["screenshot.png"])
        for message in tb.messages.list(conv.id):
            print(message.author.type, message.body)

``AsyncClient`` is the asyncio twin; ``MobileClient``/``AsyncMobileClient`` queue
feedback in the offline outbox by default. Errors: see ``tellback_sdk.errors``.
Live events: ``client.events.stream()`` (see ``tellback_sdk.events``). Verifying
webhooks in your backend: ``tellback_sdk.webhooks.verify`` (extra ``webhooks``).
"""

from tellback_sdk._async_client import AsyncClient, AsyncClientBase, AsyncMobileClient
from tellback_sdk._client import Client, LogoutResult, MobileClient, SyncClientBase
from tellback_sdk._outbox_store import AttachmentFile, OutboxFailure, QueuedItem
from tellback_sdk._retry import RetryPolicy, backoff_delay, parse_retry_after, should_retry
from tellback_sdk._version import __version__
from tellback_sdk.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AttachmentEmptyError,
    AttachmentLimitError,
    AttachmentTooLargeError,
    AttachmentTypeNotAllowedError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConversationClosedError,
    IdempotencyKeyInProgressError,
    IdempotencyKeyReusedError,
    IdentityRequiredError,
    InternalServerError,
    NotFoundError,
    OutboxError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    TellbackError,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
    UploadIncompleteError,
    UserChangedError,
)
from tellback_sdk.events import (
    AttachmentUpdated,
    ConversationCreated,
    ConversationUpdated,
    LiveEvent,
    MessageCreated,
    Reset,
    UnknownEvent,
    UnreadChanged,
    parse_event,
)
from tellback_sdk.pagination import AsyncPager, Page, SyncPager
from tellback_sdk.push import PushEvent, parse_push
from tellback_sdk.resources.events import AsyncEventStream, EventStream
from tellback_sdk.resources.outbox import FlushResult
from tellback_sdk.types import DeviceInfo, Location

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncClientBase",
    "AsyncEventStream",
    "AsyncMobileClient",
    "AsyncPager",
    "AttachmentEmptyError",
    "AttachmentFile",
    "AttachmentLimitError",
    "AttachmentTooLargeError",
    "AttachmentTypeNotAllowedError",
    "AttachmentUpdated",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "ConversationClosedError",
    "ConversationCreated",
    "ConversationUpdated",
    "DeviceInfo",
    "EventStream",
    "FlushResult",
    "IdempotencyKeyInProgressError",
    "IdempotencyKeyReusedError",
    "IdentityRequiredError",
    "InternalServerError",
    "LiveEvent",
    "Location",
    "LogoutResult",
    "MessageCreated",
    "MobileClient",
    "NotFoundError",
    "OutboxError",
    "OutboxFailure",
    "Page",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PushEvent",
    "QueuedItem",
    "RateLimitError",
    "Reset",
    "RetryPolicy",
    "ServiceUnavailableError",
    "SyncClientBase",
    "SyncPager",
    "TellbackError",
    "UnknownEvent",
    "UnprocessableEntityError",
    "UnreadChanged",
    "UnsupportedMediaTypeError",
    "UploadIncompleteError",
    "UserChangedError",
    "__version__",
    "backoff_delay",
    "parse_event",
    "parse_push",
    "parse_retry_after",
    "should_retry",
]
