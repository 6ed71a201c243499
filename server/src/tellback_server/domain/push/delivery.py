"""The push jobs: fan a message out to devices, then send to each device.

``push.fanout`` runs once per message that should notify someone (an agent's
public reply notifies the end user's devices; new feedback or a user reply
notifies the devices of the app's agents). It queues one ``push.send`` job
per device with a dedupe key, so running the fan-out twice (at-least-once)
does not send twice. ``push.send`` records every attempt in the delivery log
and maps the provider's answer: an invalid token deactivates the device,
429/5xx/network errors retry with backoff (honouring Retry-After), and
credential errors fail the job and are shown on the app's push status.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import structlog
from sqlalchemy import func, select, update

from tellback_server.db.models import (
    Agent,
    AgentApp,
    App,
    Attachment,
    Conversation,
    Device,
    EndUser,
    Message,
    PushCredential,
    PushDelivery,
)
from tellback_server.domain.apps.services import parse_settings
from tellback_server.domain.push.payloads import Notification, apns_payload, fcm_message, snippet
from tellback_server.domain.push.providers import ApnsSender, FcmSender, Outcome
from tellback_server.domain.push.services import load_credentials
from tellback_server.jobs.queue import enqueue
from tellback_server.jobs.registry import JobContext, JobRegistry, PermanentFailure, RetryLater
from tellback_server.state import AppState

log = structlog.get_logger("tellback.push")

FANOUT_JOB = "push.fanout"
SEND_JOB = "push.send"
APNS_TTL_S = 24 * 3600


@dataclass
class PushClients:
    """Open provider clients, one per app/provider/environment, rebuilt when credentials change."""

    clients: dict[tuple[UUID, str, str | None], tuple[dt.datetime, ApnsSender | FcmSender]] = field(
        default_factory=dict
    )

    async def get(
        self, state: AppState, app_id: UUID, provider: str, environment: str | None
    ) -> ApnsSender | FcmSender | None:
        async with state.db.session(write=False) as db:
            version = await db.scalar(
                select(PushCredential.updated_at).where(
                    PushCredential.app_id == app_id, PushCredential.provider == provider
                )
            )
            if version is None:
                return None
            key = (app_id, provider, environment)
            cached = self.clients.get(key)
            if cached is not None and cached[0] == version:
                return cached[1]
            loaded = await load_credentials(db, state.sealer, app_id, provider)
        if loaded is None:
            return None
        secret, version = loaded
        sender: ApnsSender | FcmSender = (
            ApnsSender(secret, environment == "sandbox", state.settings)
            if provider == "apns"
            else FcmSender(secret, state.settings)
        )
        if cached is not None:
            await cached[1].close()
        self.clients[key] = (version, sender)
        return sender

    async def drop(self, app_id: UUID, provider: str, environment: str | None) -> None:
        cached = self.clients.pop((app_id, provider, environment), None)
        if cached is not None:
            await cached[1].close()

    async def close(self) -> None:
        for _, sender in self.clients.values():
            await sender.close()
        self.clients.clear()


def _clients(state: AppState) -> PushClients:
    clients = state.extras.get("push")
    if clients is None:
        clients = state.extras["push"] = PushClients()
    assert isinstance(clients, PushClients)
    return clients


async def queue_fanout(db: Any, message_id: UUID, audience: str) -> None:
    """Called in the transaction that creates the message (the outbox write)."""
    await enqueue(
        db, FANOUT_JOB, {"message_id": str(message_id), "audience": audience}, max_attempts=10
    )


async def fanout(ctx: JobContext, payload: dict[str, Any]) -> None:
    state = ctx.state
    message_id = UUID(payload["message_id"])
    audience = payload["audience"]
    async with state.db.session(write=True) as db:
        row = (
            await db.execute(
                select(
                    Message.id,
                    Message.internal,
                    Conversation.id.label("conv_id"),
                    Conversation.app_id,
                    Conversation.end_user_id,
                )
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(Message.id == message_id)
            )
        ).first()
        if row is None or row.internal:
            return
        devices = select(Device).where(Device.active.is_(True))
        if audience == "user":
            devices = devices.where(Device.end_user_id == row.end_user_id)
        else:
            agents = (
                select(AgentApp.agent_id)
                .join(Agent, Agent.id == AgentApp.agent_id)
                .where(AgentApp.app_id == row.app_id, Agent.disabled_at.is_(None))
            )
            devices = devices.where(Device.agent_id.in_(agents))
        configured = {
            (r.app_id, r.provider)
            for r in await db.execute(select(PushCredential.app_id, PushCredential.provider))
        }
        for device in await db.scalars(devices):
            if (device.app_id, device.provider) not in configured:
                db.add(
                    PushDelivery(
                        app_id=device.app_id,
                        device_id=device.id,
                        message_id=message_id,
                        conversation_id=row.conv_id,
                        job_id=ctx.job_id,
                        provider=device.provider,
                        audience=audience,
                        status="skipped",
                        attempt=1,
                        reason=f"the app has no {device.provider.upper()} credentials",
                    )
                )
                continue
            await enqueue(
                db,
                SEND_JOB,
                {"device_id": str(device.id), "message_id": str(message_id), "audience": audience},
                max_attempts=8,
                dedupe_key=f"push:{message_id}:{device.id}",
            )


async def _notification(db: Any, device: Device, message: Message, audience: str) -> Notification:
    conv = await db.get(Conversation, message.conversation_id)
    app = await db.get(App, conv.app_id)
    settings = parse_settings(app.settings)
    has_image = bool(
        await db.scalar(
            select(func.count())
            .select_from(Attachment)
            .where(Attachment.message_id == message.id, Attachment.kind == "photo")
        )
    )
    text = snippet(message.body) or ("Sent a photo" if has_image else "Sent an attachment")
    if audience == "user":
        badge = await db.scalar(
            select(func.coalesce(func.sum(Conversation.user_unread_count), 0)).where(
                Conversation.end_user_id == conv.end_user_id
            )
        )
        agent_name = await db.scalar(select(Agent.name).where(Agent.id == message.author_agent_id))
        title = app.name if settings.content_free_push else (agent_name or app.name)
        body = "You have a new reply" if settings.content_free_push else text
        kind = "message.created"
    else:
        apps = select(AgentApp.app_id).where(AgentApp.agent_id == device.agent_id)
        badge = await db.scalar(
            select(func.count())
            .select_from(Conversation)
            .where(Conversation.app_id.in_(apps), Conversation.agent_unread_count > 0)
        )
        first = conv.message_count <= 1
        kind = "conversation.created" if first else "message.created"
        who = await db.scalar(select(EndUser.name).where(EndUser.id == conv.end_user_id))
        if settings.content_free_push:
            title, body = app.name, "New feedback" if first else "New reply"
        else:
            title = f"New feedback in {app.name}" if first else f"Reply from {who or 'a user'}"
            body = text
    return Notification(
        type=kind,
        conversation_id=str(conv.id),
        message_id=str(message.id),
        title=title,
        body=body,
        badge=int(badge or 0),
        has_image=has_image,
    )


async def _record(
    state: AppState,
    ctx: JobContext,
    device: Device,
    message: Message,
    audience: str,
    status: str,
    outcome: Outcome | None,
    reason: str | None,
) -> None:
    async with state.db.session(write=True) as db:
        db.add(
            PushDelivery(
                app_id=device.app_id,
                device_id=device.id,
                message_id=message.id,
                conversation_id=message.conversation_id,
                job_id=ctx.job_id,
                provider=device.provider,
                audience=audience,
                status=status,
                reason=reason,
                http_status=outcome.http_status if outcome else None,
                latency_ms=round(outcome.latency_ms, 2) if outcome and outcome.latency_ms else None,
                attempt=ctx.attempt,
            )
        )
        now = dt.datetime.now(dt.UTC)
        cred = (PushCredential.app_id == device.app_id) & (
            PushCredential.provider == device.provider
        )
        if status == "sent":
            await db.execute(
                update(PushCredential)
                .where(
                    cred,
                    (PushCredential.last_success_at.is_(None))
                    | (PushCredential.last_success_at < now - dt.timedelta(seconds=60)),
                )
                .values(last_success_at=now)
            )
        elif status == "failed" and outcome is not None and outcome.kind == "auth_error":
            await db.execute(
                update(PushCredential).where(cred).values(last_error=reason, last_error_at=now)
            )
        elif status == "invalid_token":
            await db.execute(
                update(Device)
                .where(Device.id == device.id)
                .values(active=False, deactivated_reason=reason, deactivated_at=now)
            )


async def send(ctx: JobContext, payload: dict[str, Any]) -> None:
    state = ctx.state
    audience = payload["audience"]
    async with state.db.session(write=False) as db:
        device = await db.get(Device, UUID(payload["device_id"]))
        message = await db.get(Message, UUID(payload["message_id"]))
        if device is None or message is None or not device.active:
            return
        notification = await _notification(db, device, message, audience)
    clients = _clients(state)
    outcome = await _send_once(state, clients, device, notification)
    if outcome.kind == "expired_provider_token":
        # Mint a new provider token (new connection) and try once more.
        await clients.drop(device.app_id, device.provider, device.apns_environment)
        outcome = await _send_once(state, clients, device, notification)
    reason = outcome.reason
    last_try = ctx.attempt >= ctx.max_attempts
    if outcome.kind == "sent":
        await _record(state, ctx, device, message, audience, "sent", outcome, None)
        return
    if outcome.kind == "invalid_token":
        await _record(state, ctx, device, message, audience, "invalid_token", outcome, reason)
        log.info("push.device_deactivated", device_id=str(device.id), reason=reason)
        return
    if outcome.kind == "retry" and not last_try:
        await _record(state, ctx, device, message, audience, "retrying", outcome, reason)
        raise RetryLater(reason or "provider unavailable", delay=outcome.retry_after)
    await _record(state, ctx, device, message, audience, "failed", outcome, reason)
    if outcome.kind == "auth_error":
        log.error(
            "push.credentials_rejected",
            app_id=str(device.app_id),
            provider=device.provider,
            reason=reason,
        )
    raise PermanentFailure(reason or "push failed")


async def _send_once(
    state: AppState, clients: PushClients, device: Device, n: Notification
) -> Outcome:
    sender = await clients.get(state, device.app_id, device.provider, device.apns_environment)
    if sender is None:
        return Outcome("failed", None, f"the app has no {device.provider.upper()} credentials")
    if isinstance(sender, ApnsSender):
        return await sender.send(
            device.token, apns_payload(n), collapse_id=n.message_id, ttl_s=APNS_TTL_S
        )
    return await sender.send(fcm_message(device.token, n))


async def close_clients(state: AppState) -> None:
    await _clients(state).close()


def register(registry: JobRegistry) -> None:
    registry.register(FANOUT_JOB, fanout, max_attempts=10, timeout_s=60)
    registry.register(
        SEND_JOB, send, max_attempts=8, timeout_s=30, base_delay_s=1.0, max_delay_s=300
    )
