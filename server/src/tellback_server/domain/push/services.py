"""Devices, push credentials and the delivery log."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any
from uuid import UUID

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from google.oauth2 import service_account
from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from tellback_server.db.models import Device, PushCredential, PushDelivery
from tellback_server.domain.apps.services import require_app
from tellback_server.domain.push.schemas import (
    AgentDeviceRegister,
    ApnsCredentialsIn,
    DeviceOut,
    DeviceRegister,
    FcmCredentialsIn,
    PushDeliveryOut,
    PushProviderStatus,
    PushStatus,
)
from tellback_server.http.deps import AgentPrincipal, ClientPrincipal
from tellback_server.http.errors import ValidationFailed
from tellback_server.http.pagination import Page, keyset_page
from tellback_server.security import Sealer

CREDENTIAL_PURPOSE = "push-credentials"
DELIVERY_STATUSES = {"sent", "retrying", "failed", "skipped", "invalid_token"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def device_out(d: Device) -> DeviceOut:
    return DeviceOut(
        id=d.id,
        platform=d.platform,
        push_provider=d.provider,
        push_token_suffix=d.token[-8:],
        apns_environment=d.apns_environment,
        app_version=d.app_version,
        locale=d.locale,
        active=d.active,
        created_at=d.created_at,
        updated_at=d.updated_at,
    )


def _check_pairing(data: DeviceRegister) -> str | None:
    if data.platform == "android" and data.push_provider == "apns":
        raise ValidationFailed.field("push_provider", "android devices use fcm")
    if data.push_provider == "apns":
        return data.apns_environment or "production"
    if data.apns_environment is not None:
        raise ValidationFailed.field("apns_environment", "only for push_provider apns")
    return None


def _token_lock(provider: str, token: str) -> int:
    """The key of a push token's advisory lock: 64 bits of a hash (a collision only
    makes two registrations wait for each other)."""
    digest = hashlib.blake2b(f"device-token:{provider}:{token}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


class DeviceService:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def _lock(self, owner_key: str, provider: str, token: str) -> None:
        """PostgreSQL: wait for any registration under way of this token or touching
        the rows this one changes (SQLite's single writer serialises them already).

        The token's advisory lock covers the row no one has written yet: two
        installations registering a new token at once would both insert it, and the
        second hit the (provider, token) unique constraint. The row locks, taken in id
        order, cover two installations swapping tokens: each deletes the other's row
        and updates its own, which in any other order deadlocks. Every registration
        takes its one advisory lock before any row lock, so the two kinds cannot wait
        on each other in a circle."""
        if self.db.get_bind().dialect.name != "postgresql":
            return
        await self.db.execute(select(func.pg_advisory_xact_lock(_token_lock(provider, token))))
        await self.db.execute(
            select(Device.id)
            .where(
                or_(
                    Device.owner_key == owner_key,
                    and_(Device.provider == provider, Device.token == token),
                )
            )
            .order_by(Device.id)
            .with_for_update()
        )

    async def _upsert(
        self, owner_key: str, app_id: UUID, data: DeviceRegister, **owner: Any
    ) -> DeviceOut:
        environment = _check_pairing(data)
        now = _now()
        await self._lock(owner_key, data.push_provider, data.push_token)
        # A token that moved to another installation leaves the old one.
        await self.db.execute(
            delete(Device).where(
                Device.provider == data.push_provider,
                Device.token == data.push_token,
                Device.owner_key != owner_key,
            )
        )
        values = {
            "app_id": app_id,
            "platform": data.platform,
            "provider": data.push_provider,
            "token": data.push_token,
            "apns_environment": environment,
            "app_version": data.app_version,
            "locale": data.locale,
            "active": True,
            "deactivated_reason": None,
            "deactivated_at": None,
            "updated_at": now,
            **owner,
        }
        dialect_insert = (
            postgresql.insert if self.db.get_bind().dialect.name == "postgresql" else sqlite.insert
        )
        stmt = dialect_insert(Device).values(
            id=uuid7(), owner_key=owner_key, created_at=now, **values
        )
        await self.db.execute(stmt.on_conflict_do_update(index_elements=["owner_key"], set_=values))
        device = await self.db.scalar(
            select(Device)
            .where(Device.owner_key == owner_key)
            .execution_options(populate_existing=True)
        )
        assert device is not None
        return device_out(device)

    async def register_client(self, client: ClientPrincipal, data: DeviceRegister) -> DeviceOut:
        return await self._upsert(
            f"inst:{client.installation_pk}",
            client.app_id,
            data,
            installation_pk=client.installation_pk,
            end_user_id=client.end_user_id,
            agent_id=None,
        )

    async def remove_client(self, client: ClientPrincipal) -> None:
        await self.db.execute(
            delete(Device).where(Device.owner_key == f"inst:{client.installation_pk}")
        )

    async def register_agent(self, agent: AgentPrincipal, data: AgentDeviceRegister) -> DeviceOut:
        if data.app_id is None:
            if len(agent.app_ids) != 1:
                raise ValidationFailed.field(
                    "app_id", "name the app whose push credentials reach this phone"
                )
            app_id = next(iter(agent.app_ids))
        elif data.app_id in agent.app_ids:
            app_id = data.app_id
        else:
            raise ValidationFailed.field("app_id", "not one of your apps")
        return await self._upsert(
            f"agent:{agent.agent_id}:{data.installation_id}",
            app_id,
            data,
            installation_pk=None,
            end_user_id=None,
            agent_id=agent.agent_id,
        )

    async def remove_agent(self, agent: AgentPrincipal, installation_id: str) -> None:
        await self.db.execute(
            delete(Device).where(Device.owner_key == f"agent:{agent.agent_id}:{installation_id}")
        )


def _validate_apns(data: ApnsCredentialsIn) -> None:
    try:
        key = load_pem_private_key(data.private_key.encode(), password=None)
    except (ValueError, TypeError):
        raise ValidationFailed.field(
            "private_key", "not a PEM private key (the .p8 file)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValidationFailed.field("private_key", "APNs keys are P-256 (ES256) keys")


def _validate_fcm(info: dict[str, Any]) -> None:
    missing = [
        k for k in ("project_id", "private_key", "client_email", "token_uri") if not info.get(k)
    ]
    if info.get("type") != "service_account" or missing:
        raise ValidationFailed.field(
            "service_account",
            "expected a Firebase service-account JSON"
            + (f" (missing {', '.join(missing)})" if missing else ""),
        )
    try:
        service_account.Credentials.from_service_account_info(info)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError) as exc:
        raise ValidationFailed.field("service_account", f"cannot be loaded: {exc}") from None


class CredentialService:
    def __init__(self, db: AsyncSession, sealer: Sealer) -> None:
        self.db = db
        self.sealer = sealer

    async def _store(
        self, app_id: UUID, provider: str, secret: dict[str, Any], summary: str
    ) -> None:
        await require_app(self.db, app_id)
        sealed = self.sealer.seal(
            json.dumps(secret).encode(), f"{CREDENTIAL_PURPOSE}:{app_id}:{provider}"
        )
        row = await self.db.scalar(
            select(PushCredential).where(
                PushCredential.app_id == app_id, PushCredential.provider == provider
            )
        )
        if row is None:
            self.db.add(
                PushCredential(app_id=app_id, provider=provider, sealed=sealed, summary=summary)
            )
        else:
            row.sealed, row.summary, row.updated_at = sealed, summary, _now()
            # (what the status says was proven or refused was of the credentials before)
            row.last_error = row.last_error_at = row.last_success_at = None
        await self.db.flush()

    async def put_apns(self, app_id: UUID, data: ApnsCredentialsIn) -> PushStatus:
        _validate_apns(data)
        secret = {
            "team_id": data.team_id,
            "key_id": data.key_id,
            "private_key": data.private_key,
            "topic": data.topic,
        }
        await self._store(
            app_id, "apns", secret, f"team {data.team_id}, key {data.key_id}, topic {data.topic}"
        )
        return await self.status(app_id)

    async def put_fcm(self, app_id: UUID, data: FcmCredentialsIn) -> PushStatus:
        _validate_fcm(data.service_account)
        info = data.service_account
        await self._store(
            app_id, "fcm", info, f"project {info['project_id']}, {info['client_email']}"
        )
        return await self.status(app_id)

    async def remove(self, app_id: UUID, provider: str) -> None:
        await require_app(self.db, app_id)
        await self.db.execute(
            delete(PushCredential).where(
                PushCredential.app_id == app_id, PushCredential.provider == provider
            )
        )

    async def status(self, app_id: UUID) -> PushStatus:
        await require_app(self.db, app_id)
        rows = {
            r.provider: r
            for r in await self.db.scalars(
                select(PushCredential).where(PushCredential.app_id == app_id)
            )
        }

        def one(provider: str) -> PushProviderStatus:
            r = rows.get(provider)
            if r is None:
                return PushProviderStatus(provider=provider, configured=False)  # type: ignore[arg-type]
            return PushProviderStatus(
                provider=provider,  # type: ignore[arg-type]
                configured=True,
                summary=r.summary,
                last_error=r.last_error,
                last_error_at=r.last_error_at,
                last_success_at=r.last_success_at,
                updated_at=r.updated_at,
            )

        return PushStatus(apns=one("apns"), fcm=one("fcm"))

    async def deliveries(
        self, app_id: UUID, status: str | None, cursor: str | None, limit: int
    ) -> Page[PushDeliveryOut]:
        await require_app(self.db, app_id)
        stmt = select(PushDelivery).where(PushDelivery.app_id == app_id)
        if status is not None:
            stmt = stmt.where(PushDelivery.status == status)
        rows, nxt = await keyset_page(
            self.db, stmt, PushDelivery.created_at, PushDelivery.id, cursor, limit, descending=True
        )
        return Page(
            items=[
                PushDeliveryOut(
                    id=r.id,
                    status=r.status,
                    provider=r.provider,
                    audience=r.audience,
                    device_id=r.device_id,
                    message_id=r.message_id,
                    conversation_id=r.conversation_id,
                    reason=r.reason,
                    http_status=r.http_status,
                    latency_ms=r.latency_ms,
                    attempt=r.attempt,
                    created_at=r.created_at,
                )
                for r in rows
            ],
            next_cursor=nxt,
        )


async def load_credentials(
    db: AsyncSession, sealer: Sealer, app_id: UUID, provider: str
) -> tuple[dict[str, Any], dt.datetime] | None:
    row = await db.scalar(
        select(PushCredential).where(
            PushCredential.app_id == app_id, PushCredential.provider == provider
        )
    )
    if row is None:
        return None
    plain = sealer.open(row.sealed, f"{CREDENTIAL_PURPOSE}:{app_id}:{provider}")
    secret: dict[str, Any] = json.loads(plain)
    return secret, row.updated_at
