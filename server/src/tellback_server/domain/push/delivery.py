"""The push jobs: fan a message out to devices, then send to each device.

``push.fanout`` runs once per message that should notify someone (an agent's
public reply notifies the end user's devices; new feedback or a user reply
notifies the devices of the app's agents). It queues one ``push.send`` job
per device with a dedupe key, so running the fan-out twice (at-least-once)
does not send twice. ``push.send`` records every attempt in the delivery log
and maps the provider's answer: an invalid token deactivates the device;
429/5xx/network errors, and credentials or settings the provider refuses (shown
on the app's push status), are waited out (honouring Retry-After) until the
notification is a day old, so a push outlives an outage or a key being replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID, uuid5

import structlog
from sqlalchemy import (
    Exists,
    Select,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tellback_server.db.base import table_of
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
from tellback_server.db.prepared import Prepared
from tellback_server.domain.apps.services import parse_settings
from tellback_server.domain.push.payloads import Notification, apns_payload, fcm_message, snippet
from tellback_server.domain.push.providers import (
    SEND_TIMEOUT_S,
    SUSPECT_TOKEN_REASONS,
    ApnsSender,
    FcmSender,
    Outcome,
)
from tellback_server.domain.push.services import load_credentials
from tellback_server.jobs.queue import enqueue, enqueue_in
from tellback_server.jobs.registry import JobContext, JobRegistry, PermanentFailure, WaitOut
from tellback_server.jobs.worker import backoff_delay
from tellback_server.state import AppState

log = structlog.get_logger("tellback.push")

FANOUT_JOB = "push.fanout"
SEND_JOB = "push.send"
APNS_TTL_S = 24 * 3600
# New or removed credentials reach running workers within this many seconds.
CREDENTIALS_RECHECK_S = 10.0
SEND_CONCURRENCY = 500  # streams in flight per client (APNs allows ~1000 per connection)
# After the provider refused an app's credentials, its sends wait this long before one
# tries them again (instead of each queued push asking the provider to refuse it too).
REFUSED_HOLD_S = 60.0
# Outcomes waited out: the provider or the app's setup, not the device, stands in the way.
WAIT_KINDS = {"retry", "auth_error", "setup_error", "held"}

_Key = tuple[UUID, str, str | None]  # app, provider, APNs environment


@dataclass
class PushClients:
    """Open provider clients, one per app/provider/environment, rebuilt when credentials change."""

    clients: dict[_Key, tuple[dt.datetime, ApnsSender | FcmSender]] = field(default_factory=dict)
    # When each client's credentials were last compared with the database.
    checked: dict[_Key, float] = field(default_factory=dict)
    # When the provider last refused each client's credentials (see REFUSED_HOLD_S).
    refused: dict[_Key, float] = field(default_factory=dict)
    # Replaced clients, closed once the sends already on them have had their time.
    retiring: set[asyncio.Task[None]] = field(default_factory=set)

    async def get(
        self, state: AppState, app_id: UUID, provider: str, environment: str | None
    ) -> ApnsSender | FcmSender | None:
        key = (app_id, provider, environment)
        cached = self.clients.get(key)
        now = time.monotonic()
        if cached is not None and now - self.checked.get(key, 0.0) < CREDENTIALS_RECHECK_S:
            return cached[1]
        self.checked[key] = now
        async with state.db.session(write=False) as db:
            # (updated_at changes with the credentials alone: _record keeps it as it is.)
            version = await db.scalar(
                select(PushCredential.updated_at).where(
                    PushCredential.app_id == app_id, PushCredential.provider == provider
                )
            )
            if version is None:
                await self.drop(*key)
                return None
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
            self._retire(cached[1])
        self.clients[key] = (version, sender)
        self.refused.pop(key, None)  # (new credentials: try them at once)
        return sender

    async def drop(self, app_id: UUID, provider: str, environment: str | None) -> None:
        self.checked.pop((app_id, provider, environment), None)
        cached = self.clients.pop((app_id, provider, environment), None)
        if cached is not None:
            self._retire(cached[1])

    def _retire(self, sender: ApnsSender | FcmSender) -> None:
        """Close ``sender`` once sends of other jobs already on it have had their time
        (closing at once cut them off, and their pushes went out again on retry)."""

        async def close_later() -> None:
            try:
                await asyncio.sleep(SEND_TIMEOUT_S + 1)
            finally:
                await sender.close()

        task = asyncio.create_task(close_later())
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    async def close(self) -> None:
        for _, sender in self.clients.values():
            await sender.close()
        self.clients.clear()
        for task in list(self.retiring):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _clients(state: AppState) -> PushClients:
    clients = state.extras.get("push")
    if clients is None:
        clients = state.extras["push"] = PushClients()
    assert isinstance(clients, PushClients)
    return clients


async def queue_fanout(db: AsyncSession, message_id: UUID, audience: str) -> None:
    """Called in the transaction that creates the message (the outbox write)."""
    await db.run_sync(queue_fanout_in, message_id, audience)


def queue_fanout_in(
    db: Session,
    message_id: UUID,
    audience: str,
    *,
    listening: bool | None = None,
    first: bool | None = None,
) -> None:
    """Queue the notification job, unless no active device may hear of the message.

    Most messages of most apps have nobody to notify (no agent has the app
    installed, the user never allowed notifications): one indexed lookup in the
    creating transaction spares the job and the worker's three transactions. A
    device registered after this commit hears of later messages, as it would have
    if the job had already run. ``listening``: the caller already asked (for the
    agents, with :func:`agents_listen` in a query of its own).
    """
    if listening is None:
        listening = bool(_ANY_DEVICE[audience].execute(db, {"message_id": message_id}))
    if not listening:
        return
    enqueue_in(db, **fanout_job(message_id, audience, first=first))


def fanout_job(message_id: UUID, audience: str, *, first: bool | None = None) -> dict[str, Any]:
    """The notification job of a message (``enqueue_in``'s or ``job_row``'s arguments).
    ``first``: for the agents, whether the message is new feedback (``conversation.created``)
    or a later one, as the writer knew it (when the job runs, more may have come)."""
    payload: dict[str, Any] = {"message_id": str(message_id), "audience": audience}
    if first is not None:
        payload["first"] = first
    return {"kind": FANOUT_JOB, "payload": payload, "max_attempts": 10}


@dataclass
class _Facts:
    """What every notification for one message shares, loaded once."""

    message: Message
    conv: Conversation
    app: App
    content_free: bool
    has_image: bool
    text: str
    agent_name: str | None
    user_name: str | None
    user_unread: int  # the end user's unread replies across their conversations: their badge


async def _facts(db: Any, message_id: UUID) -> _Facts | None:
    # One round trip: this runs for every notified message, on the reply -> push path.
    has_photo = (
        select(func.count())
        .select_from(Attachment)
        .where(Attachment.message_id == Message.id, Attachment.kind == "photo")
        .scalar_subquery()
    )
    user_unread = user_unread_total(Conversation.app_id, Conversation.end_user_id)
    row = (
        await db.execute(
            select(Message, Conversation, App, Agent.name, EndUser.name, has_photo, user_unread)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .join(App, App.id == Conversation.app_id)
            .join(EndUser, EndUser.id == Conversation.end_user_id)
            .outerjoin(Agent, Agent.id == Message.author_agent_id)
            .where(Message.id == message_id)
        )
    ).first()
    if row is None:
        return None
    message, conv, app, agent_name, user_name, photos, unread = row
    if message.internal:
        return None
    has_image = bool(photos)
    return _Facts(
        message=message,
        conv=conv,
        app=app,
        content_free=parse_settings(app.settings).content_free_push,
        has_image=has_image,
        text=snippet(message.body) or ("Sent a photo" if has_image else "Sent an attachment"),
        agent_name=agent_name,
        user_name=user_name,
        user_unread=int(unread or 0),
    )


async def _agent_badges(db: Any, devices: list[Device]) -> dict[UUID, int]:
    """Badge per agent's device: the conversations its agent has to read, over the apps
    the agent serves. One statement whatever the number of agents: each app's unread
    conversations are counted once, then summed per agent."""
    agent_ids = {d.agent_id for d in devices if d.agent_id is not None}
    per_agent: dict[UUID, int] = {}
    if agent_ids:
        served = select(AgentApp.app_id).where(AgentApp.agent_id.in_(agent_ids))
        per_app = (
            select(Conversation.app_id, func.count().label("unread"))
            .where(Conversation.app_id.in_(served), Conversation.agent_unread_count > 0)
            .group_by(Conversation.app_id)
            .subquery()
        )
        rows = await db.execute(
            select(AgentApp.agent_id, func.sum(per_app.c.unread))
            .join(per_app, per_app.c.app_id == AgentApp.app_id)
            .where(AgentApp.agent_id.in_(agent_ids))
            .group_by(AgentApp.agent_id)
        )
        per_agent = {agent_id: int(unread) for agent_id, unread in rows}
    return {d.id: per_agent.get(d.agent_id, 0) if d.agent_id else 0 for d in devices}


def _notification(facts: _Facts, audience: str, badge: int, first: bool | None) -> Notification:
    app_name = facts.app.name
    if audience == "user":
        kind = "message.created"
        title = app_name if facts.content_free else (facts.agent_name or app_name)
        body = "You have a new reply" if facts.content_free else facts.text
    else:
        if first is None:  # (a job queued before the writer said)
            first = facts.conv.message_count <= 1
        kind = "conversation.created" if first else "message.created"
        if facts.content_free:
            title, body = app_name, "New feedback" if first else "New reply"
        else:
            who = facts.user_name or "a user"
            title = f"New feedback in {app_name}" if first else f"Reply from {who}"
            body = facts.text
    return Notification(
        type=kind,
        conversation_id=str(facts.conv.id),
        message_id=str(facts.message.id),
        title=title,
        body=body,
        badge=badge,
        has_image=facts.has_image,
    )


async def _send_one(sender: ApnsSender | FcmSender, device: Device, n: Notification) -> Outcome:
    if isinstance(sender, ApnsSender):
        return await sender.send(
            device.token,
            apns_payload(n),
            collapse_id=n.message_id,
            ttl_s=APNS_TTL_S,
            notification_id=uuid5(device.id, n.message_id),  # (the same on every retry)
        )
    return await sender.send(fcm_message(device.token, n))


async def _send_group(
    state: AppState, clients: PushClients, devices: list[Device], notes: dict[UUID, Notification]
) -> dict[UUID, Outcome]:
    """Send to devices sharing one app/provider/environment, concurrently on one client."""
    first = devices[0]
    key = (first.app_id, first.provider, first.apns_environment)
    provider = first.provider.upper()
    outcomes: dict[UUID, Outcome] = {}
    sem = asyncio.Semaphore(SEND_CONCURRENCY)
    for _ in range(2):
        sender = await clients.get(state, *key)
        if sender is None:
            missing = Outcome("failed", None, f"the app has no {provider} credentials")
            return {d.id: missing for d in devices}
        refused_at = clients.refused.get(key)
        if refused_at is not None and time.monotonic() - refused_at < REFUSED_HOLD_S:
            held = Outcome("held", None, f"{provider} refused the app's credentials")
            return {d.id: held for d in devices}

        async def one(
            device: Device, s: ApnsSender | FcmSender = sender, sem: asyncio.Semaphore = sem
        ) -> tuple[UUID, Outcome]:
            async with sem:
                return device.id, await _send_one(s, device, notes[device.id])

        outcomes.update(await asyncio.gather(*(one(d) for d in devices)))
        expired = [d for d in devices if outcomes[d.id].kind == "expired_provider_token"]
        if not expired:
            break
        # Mint a new provider token (a new connection) and send those once more.
        await clients.drop(*key)
        devices = expired
    else:  # refused a fresh token too: this server's clock is off
        for d in devices:
            outcomes[d.id] = replace(
                outcomes[d.id], kind="auth_error", reason="ExpiredProviderToken (check the clock)"
            )
    assert sender is not None  # (the loop returned otherwise)
    if any(o.kind == "sent" for o in outcomes.values()):
        sender.proven = True
        clients.refused.pop(key, None)
    elif any(o.kind == "auth_error" for o in outcomes.values()):
        clients.refused[key] = time.monotonic()
    if not sender.proven:  # (these credentials have not delivered anything here yet)
        for device_id, o in outcomes.items():
            if o.kind == "invalid_token" and o.reason in SUSPECT_TOKEN_REASONS:
                why = f"{o.reason} before these credentials delivered anything: check the app's"
                what = "topic" if provider == "APNS" else "Firebase project"
                outcomes[device_id] = replace(o, kind="setup_error", reason=f"{why} {what}")
    return outcomes


async def _deliver(
    state: AppState,
    ctx: JobContext,
    facts: _Facts,
    audience: str,
    devices: list[Device],
    *,
    final: bool,
    first: bool | None,
) -> list[tuple[Device, Outcome]]:
    """Send one message to ``devices``, record every outcome; return the ones to retry."""
    if audience == "user":  # (read with the facts)
        badges = {d.id: facts.user_unread for d in devices}
    else:
        async with state.db.session(write=False) as db:
            badges = await _agent_badges(db, devices)
    notes = {d.id: _notification(facts, audience, badges[d.id], first) for d in devices}
    groups: dict[tuple[UUID, str, str | None], list[Device]] = {}
    for d in devices:
        groups.setdefault((d.app_id, d.provider, d.apns_environment), []).append(d)
    clients = _clients(state)
    outcomes: dict[UUID, Outcome] = {}
    for group in groups.values():
        outcomes.update(await _send_group(state, clients, group, notes))
    wait = [(d, outcomes[d.id]) for d in devices if outcomes[d.id].kind in WAIT_KINDS]
    retrying = set() if final else {d.id for d, _ in wait}
    await _record(state, ctx, facts, audience, devices, outcomes, retrying=retrying)
    return wait


def _status(outcome: Outcome, retrying: bool) -> str:
    if outcome.kind in {"sent", "invalid_token"}:
        return outcome.kind
    return "retrying" if retrying else "failed"


async def _record(
    state: AppState,
    ctx: JobContext,
    facts: _Facts,
    audience: str,
    devices: list[Device],
    outcomes: dict[UUID, Outcome],
    retrying: set[UUID],
) -> None:
    now = dt.datetime.now(dt.UTC)
    rows = []
    for d in devices:
        o = outcomes[d.id]
        if o.kind == "held":
            continue  # (nothing was sent)
        status = _status(o, d.id in retrying)
        state.metrics.push.labels(d.provider, status, _reason_label(o)).inc()
        rows.append(
            {
                "app_id": d.app_id,
                "device_id": d.id,
                "message_id": facts.message.id,
                "conversation_id": facts.conv.id,
                "job_id": ctx.job_id,
                "provider": d.provider,
                "audience": audience,
                "status": status,
                "reason": o.reason,
                "http_status": o.http_status,
                "latency_ms": round(o.latency_ms, 2) if o.latency_ms else None,
                "attempt": ctx.attempt,
            }
        )
    # Deactivated only if the device still has the token that was refused: the app may
    # have registered a fresh one while the send was in flight.
    invalid = [
        {"b_id": d.id, "b_token": d.token}
        for d in devices
        if outcomes[d.id].kind == "invalid_token"
    ]
    setup_errors = {
        (d.app_id, d.provider): outcomes[d.id].reason
        for d in devices
        if outcomes[d.id].kind in {"auth_error", "setup_error"}
    }
    sent_to = {(d.app_id, d.provider) for d in devices if outcomes[d.id].kind == "sent"}
    credentials = table_of(PushCredential)
    # (updated_at is the credentials' version, which PushClients compares: kept as it is.)
    unchanged = {"updated_at": credentials.c.updated_at}
    async with state.db.session(write=True) as db:
        if rows:
            await db.execute(insert(PushDelivery), rows)
        if invalid:
            await db.execute(_DEACTIVATE, [{**one, "b_at": now} for one in invalid])
        for (app_id, provider), reason in setup_errors.items():
            log.error(
                "push.credentials_rejected", app_id=str(app_id), provider=provider, reason=reason
            )
            await db.execute(
                update(credentials)
                .where(credentials.c.app_id == app_id, credentials.c.provider == provider)
                .values(last_error=reason, last_error_at=now, **unchanged)
            )
        for app_id, provider in sent_to:
            recorded = credentials.c.last_success_at
            await db.execute(
                update(credentials)
                .where(
                    credentials.c.app_id == app_id,
                    credentials.c.provider == provider,
                    recorded.is_(None) | (recorded < now - dt.timedelta(seconds=60)),
                )
                .values(last_success_at=now, **unchanged)
            )
    if invalid:
        log.info("push.devices_deactivated", count=len(invalid))


_DEVICES = table_of(Device)
_DEACTIVATE = (
    update(_DEVICES)
    .where(
        _DEVICES.c.id == bindparam("b_id", type_=_DEVICES.c.id.type),
        _DEVICES.c.token == bindparam("b_token"),
    )
    .values(
        active=False,
        deactivated_reason="the provider rejected the token",
        deactivated_at=bindparam("b_at", type_=_DEVICES.c.deactivated_at.type),
    )
)


def _reason_label(o: Outcome) -> str:
    """The metric's reason: the provider's word (``Unregistered``), else the outcome's
    kind (our own reasons carry details that would make a label per message)."""
    if o.reason is not None and _PROVIDER_WORD.fullmatch(o.reason):
        return o.reason
    return o.kind


_PROVIDER_WORD = re.compile(r"[A-Za-z_]{1,40}")


def _agent_phones() -> Select[tuple[Any]]:
    """Active phones of enabled agents, joined to the apps the agents serve (filter on
    ``agent_apps.app_id``): who may hear of an app's new feedback and user replies."""
    devices, agent_apps, agents = table_of(Device), table_of(AgentApp), table_of(Agent)
    return (
        select(literal_column("1"))
        .select_from(devices)
        .join(agents, agents.c.id == devices.c.agent_id)
        .join(agent_apps, agent_apps.c.agent_id == agents.c.id)
        .where(agents.c.disabled_at.is_(None), devices.c.active.is_(True))
    )


def agents_listen(app_id: Any = None) -> Exists:
    """Whether an active phone of an enabled agent of the app (``app_id``: an expression
    of the enclosing query, by default the parameter ``app_id``) may hear of its new
    feedback: the "agents" question of :func:`queue_fanout_in`, for a query that asks
    it along with what it reads or writes anyway."""
    agent_apps = table_of(AgentApp)
    if app_id is None:
        app_id = bindparam("app_id", type_=agent_apps.c.app_id.type)
    return exists(_agent_phones().where(agent_apps.c.app_id == app_id))


def _user_phones() -> Select[tuple[Any]]:
    """Active devices of end users (filter on ``devices.end_user_id``): who may hear of
    an agent's reply."""
    devices = table_of(Device)
    return select(literal_column("1")).select_from(devices).where(devices.c.active.is_(True))


def user_unread_total(app_id: Any, end_user_id: Any) -> Any:
    """The end user's unread replies over their conversations in the app (``app_id``,
    ``end_user_id``: columns of the enclosing query), as a scalar subquery: their push
    badge, and the total an ``unread.changed`` event carries."""
    others = table_of(Conversation).alias("others")
    return (
        select(func.coalesce(func.sum(others.c.user_unread_count), 0))
        .where(others.c.app_id == app_id, others.c.end_user_id == end_user_id)
        .scalar_subquery()
    )


def user_listens(end_user_id: Any) -> Exists:
    """Whether an active device of the end user (``end_user_id``: a column of the
    enclosing query) may hear of an agent's reply: the "user" question of
    :func:`queue_fanout_in`, for a query that asks it along with what it reads anyway."""
    return exists(_user_phones().where(table_of(Device).c.end_user_id == end_user_id))


def _any_device(audience: str) -> Prepared:
    """One active device that may hear of the message (:func:`queue_fanout_in`)."""
    devices, convs, messages = table_of(Device), table_of(Conversation), table_of(Message)
    stmt: Select[tuple[Any]]
    if audience == "user":
        stmt = _user_phones().join(convs, convs.c.end_user_id == devices.c.end_user_id)
    else:
        stmt = _agent_phones().join(convs, convs.c.app_id == table_of(AgentApp).c.app_id)
    return Prepared(
        stmt.join(messages, messages.c.conversation_id == convs.c.id)
        .where(messages.c.id == bindparam("message_id", type_=messages.c.id.type))
        .limit(1)
    )


_ANY_DEVICE = {"user": _any_device("user"), "agents": _any_device("agents")}


async def fanout(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Send one message to every device that should hear of it, then queue retries.

    Re-runs (at-least-once) skip devices already recorded as sent for the message.
    """
    state = ctx.state
    message_id = UUID(payload["message_id"])
    audience = payload["audience"]
    # Queued only when some device could hear of the message (queue_fanout_in): the
    # device query below finds out who, or that they have gone since.
    async with state.db.session(write=False) as db:
        facts = await _facts(db, message_id)
        if facts is None:
            return
        stmt = select(Device).where(Device.active.is_(True))
        if audience == "user":
            stmt = stmt.where(Device.end_user_id == facts.conv.end_user_id)
        else:
            stmt = stmt.where(Device.agent_id.in_(_serving_agents(facts.conv.app_id)))
        done = select(PushDelivery.device_id).where(
            PushDelivery.message_id == message_id, PushDelivery.status.in_(("sent", "skipped"))
        )
        configured = exists().where(
            PushCredential.app_id == Device.app_id, PushCredential.provider == Device.provider
        )
        found = (await db.execute(stmt.add_columns(configured).where(Device.id.not_in(done)))).all()
    unconfigured = [d for d, has_credentials in found if not has_credentials]
    if unconfigured:
        async with state.db.session(write=True) as db:
            db.add_all(
                PushDelivery(
                    app_id=d.app_id,
                    device_id=d.id,
                    message_id=message_id,
                    conversation_id=facts.conv.id,
                    job_id=ctx.job_id,
                    provider=d.provider,
                    audience=audience,
                    status="skipped",
                    attempt=1,
                    reason=f"the app has no {d.provider.upper()} credentials",
                )
                for d in unconfigured
            )
    devices = [d for d, has_credentials in found if has_credentials]
    if not devices:
        return
    first = payload.get("first")
    retry = await _deliver(state, ctx, facts, audience, devices, final=False, first=first)
    if retry:
        async with state.db.session(write=True) as db:
            for device, outcome in retry:
                wait = max(backoff_delay(1, 1.0, 300.0), min(outcome.retry_after or 0.0, 86400))
                await enqueue(
                    db,
                    SEND_JOB,
                    {
                        "device_id": str(device.id),
                        "message_id": str(message_id),
                        "audience": audience,
                        **({} if first is None else {"first": first}),
                    },
                    max_attempts=7,
                    run_after=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=wait),
                    dedupe_key=f"push:{message_id}:{device.id}",
                )


def _serving_agents(app_id: Any) -> Select[tuple[UUID]]:
    """The enabled agents serving the app: whose phones hear of its new feedback."""
    return (
        select(AgentApp.agent_id)
        .join(Agent, Agent.id == AgentApp.agent_id)
        .where(AgentApp.app_id == app_id, Agent.disabled_at.is_(None))
    )


async def _still_hears(db: AsyncSession, device: Device, facts: _Facts, audience: str) -> bool:
    """Whether ``device`` may still hear of the message, when a retry runs: since the
    fan-out, a logout may have moved the installation's device to a new anonymous end
    user, or its agent been disabled or taken off the app."""
    if audience == "user":
        return device.end_user_id == facts.conv.end_user_id
    serving = _serving_agents(facts.conv.app_id).where(AgentApp.agent_id == device.agent_id)
    return device.agent_id is not None and await db.scalar(serving) is not None


async def send(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Retry one device (queued by the fan-out after a temporary failure), until the
    notification is a day old (APNS_TTL_S): an outage, or credentials the provider
    refused, are waited out without spending attempts."""
    state = ctx.state
    audience = payload["audience"]
    async with state.db.session(write=False) as db:
        device = await db.get(Device, UUID(payload["device_id"]))
        facts = await _facts(db, UUID(payload["message_id"]))
        if device is None or facts is None or not device.active:
            return
        if not await _still_hears(db, device, facts, audience):
            return
    age = (dt.datetime.now(dt.UTC) - facts.message.created_at).total_seconds()
    final = ctx.attempt >= ctx.max_attempts or age >= APNS_TTL_S
    first = payload.get("first")
    wait = await _deliver(state, ctx, facts, audience, [device], final=final, first=first)
    if not wait:
        return
    _, outcome = wait[0]
    reason = outcome.reason or "provider unavailable"
    if final:
        raise PermanentFailure(f"given up after {age / 3600:.1f} h: {reason}")
    raise WaitOut(reason, delay=outcome.retry_after)


async def close_clients(state: AppState) -> None:
    await _clients(state).close()


def register(registry: JobRegistry) -> None:
    registry.register(FANOUT_JOB, fanout, max_attempts=10, timeout_s=300)
    registry.register(
        SEND_JOB, send, max_attempts=7, timeout_s=60, base_delay_s=2.0, max_delay_s=300
    )
