"""All ORM models; importing this package registers every table on the metadata."""

from tellback_server.db.models.agents import Agent, AgentApp, console_signouts
from tellback_server.db.models.apps import (
    AdminToken,
    App,
    AppIdentitySecret,
    secret_key_checks,
)
from tellback_server.db.models.conversations import Attachment, Conversation, Message
from tellback_server.db.models.events import (
    Event,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from tellback_server.db.models.identity import ClientSession, EndUser, Installation
from tellback_server.db.models.ops import IdempotencyKey, Job
from tellback_server.db.models.push import Device, PushCredential, PushDelivery

__all__ = [
    "AdminToken",
    "Agent",
    "AgentApp",
    "App",
    "AppIdentitySecret",
    "Attachment",
    "ClientSession",
    "Conversation",
    "Device",
    "EndUser",
    "Event",
    "IdempotencyKey",
    "Installation",
    "Job",
    "Message",
    "PushCredential",
    "PushDelivery",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "console_signouts",
    "secret_key_checks",
]
